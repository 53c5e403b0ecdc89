import BlksnapControlProtocol
import BlksnapEngine
import CBlksnapABI
import FoundationEssentials
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// blksnapctl attach and detach, as JSON over the control socket.
public enum DeviceRequests {

    public static func answer(_ type: UInt32, _ payload: [UInt8], _ plane: DataPlane, configDir: String,
                       logger: Logger) -> (Int32, [UInt8]) {
        do {
            switch type {
            case BLKSNAP_CONTROL_ATTACH.rawValue:
                let request = try JSONDecoder().decode(AttachRequest.self, from: Data(payload))
                if request.persist == true && request.name == nil {
                    throw BlksnapError(.invalidArgument, "--persist declares a device by its name; give one with --name")
                }
                let live = request.live == true
                let attached = live
                    ? try plane.attachLive(request.backing, name: request.name)
                    : try plane.attach(backing: request.backing, size: request.size, name: request.name)
                if request.persist == true, let name = request.name {
                    do {
                        // A volume's size is LVM's business (lvextend between
                        // boots): a live declaration does not pin it.
                        try DeclaredDevices.declare(.init(name: name, backing: request.backing,
                                                          sizeBytes: live ? nil : attached.sizeBytes, live: live),
                                                    in: configDir)
                    } catch {
                        if let devId = plane.resolve(attached.devId) {
                            if live { try? plane.detachLive(devId) } else { try? plane.detach(devId) }
                        }
                        throw error
                    }
                }
                return (0, Array(try JSONEncoder().encode(attached)))
            default:
                let request = try JSONDecoder().decode(DetachRequest.self, from: Data(payload))
                let devId = plane.resolve(request.device)
                let name = devId.flatMap { plane.name(of: $0) } ?? request.device
                if let devId {
                    if request.live == true { try plane.detachLive(devId) } else { try plane.detach(devId) }
                } else if request.forget != true {
                    throw BlksnapError(.noSuchAddressOrDevice, "\(request.device) is not a routed device")
                }
                if request.forget == true {
                    guard try DeclaredDevices.forget(name, in: configDir) || devId != nil else {
                        throw BlksnapError(.noSuchAddressOrDevice, "\(request.device) is neither routed nor declared")
                    }
                }
                return (0, [])
            }
        } catch let error as BlksnapError {
            logger.error("blksnapd: \(error)")
            return (-error.errno.rawValue, Array((try? JSONEncoder().encode(Refusal(error: error.message))) ?? Data()))
        } catch {
            return (-EINVAL, Array((try? JSONEncoder().encode(Refusal(error: "malformed request: \(error)"))) ?? Data()))
        }
    }
}

extension DeviceRequests {
    /// What only the data plane knows: nodes, names, declared devices.
    public static func describe(_ status: inout DaemonStatus, _ plane: DataPlane, _ engine: Engine?) {
        let nodes = plane.nodes
        let names = plane.names
        let connections = plane.connections
        for i in status.devices.indices {
            status.devices[i].node = nodes[status.devices[i].devId]
            status.devices[i].name = names[status.devices[i].devId]
            status.devices[i].connections = connections[status.devices[i].devId]
        }
        for s in status.snapshots.indices {
            for i in status.snapshots[s].images.indices {
                status.snapshots[s].images[i].node = nodes[status.snapshots[s].images[i].imageDevId]
            }
        }
        status.declared = plane.declaredStates.map { d in
            let devId = d.devId?.description
            return DeclaredDevice(
                name: d.device.name, backing: d.device.backing, state: DeclaredDevice.State(rawValue: d.state) ?? .refused,
                reason: d.why, node: devId.flatMap { nodes[$0] }, devId: devId,
                link: d.state == "routed" ? "/dev/disk/by-blksnap/\(d.device.name)" : nil,
                cbtOrigin: d.state == "routed" ? d.devId.flatMap { engine?.routedDevice($0)?.cbtOutcome.origin } ?? .none : .none)
        }
    }
}
