import BlksnapABI
import BlksnapControlProtocol
import BlksnapEngine
import Logging

/// blksnapd's NBD exports of the devices it makes: every routed device and
/// image is also an export, named as its kernel device (loop64, nbd15,
/// blksnap-image0), with the CBT context of the routed device; and the list
/// of them that `blksnapctl status` shows.
public final class DeviceExports: @unchecked Sendable {
    let server: Server
    /// The Unix socket the URIs name.
    let socketPath: String
    let logger: Logger
    private weak var engine: Engine?
    private let lock = Lock()
    private var list: [DaemonStatus.ExportInfo] = []

    public init(server: Server, socketPath: String, engine: Engine, logger: Logger) {
        (self.server, self.socketPath, self.engine, self.logger) = (server, socketPath, engine, logger)
    }

    /// A device appeared; `original` is the routed device an image is of.
    public func add(name: String, device: any BlockDevice, devId: DevId, original: DevId?) {
        guard let engine else { return }
        let export = Export(name: name, description: "blksnap \(original == nil ? "routed device" : "snapshot image") \(devId)",
                            device: device, changes: Export.cbtSource(engine: engine, devId: original ?? devId))
        do {
            try server.add(export)
            let info = DaemonStatus.ExportInfo(name: name, devId: devId.description, uri: "nbd+unix:///\(name)?socket=\(socketPath)")
            lock.withLock { list.append(info) }
        } catch {
            logger.error("blksnapd: cannot export \(name) over NBD: \(error)")
        }
    }

    /// A device is about to go.
    public func remove(name: String) {
        server.remove(exportNamed: name)
        lock.withLock { list.removeAll { $0.name == name } }
    }

    /// The exports of the moment, for status.
    public var all: [DaemonStatus.ExportInfo] { lock.withLock { list } }
}
