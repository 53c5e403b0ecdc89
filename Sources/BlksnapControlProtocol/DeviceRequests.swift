/// `blksnapctl attach` and `detach` as they cross the control socket: JSON
/// payloads of BLKSNAP_CONTROL_ATTACH and BLKSNAP_CONTROL_DETACH. An
/// optional field left out means its default, so an older blksnapctl's
/// request still reads.
public struct AttachRequest: Codable, Sendable, Equatable {
    /// An absolute path (file or block device) or an NBD URI.
    public var backing: String
    public var size: UInt64?
    public var live: Bool?
    public var name: String?
    public var persist: Bool?

    public init(backing: String, size: UInt64? = nil, live: Bool? = nil, name: String? = nil, persist: Bool? = nil) {
        (self.backing, self.size, self.live, self.name, self.persist) = (backing, size, live, name, persist)
    }
}

/// The device an attach made.
public struct AttachReply: Codable, Sendable, Equatable {
    public var node: String
    public var devId: String
    public var backing: String
    public var sizeBytes: UInt64
    /// /dev/disk/by-blksnap/NAME of a named device.
    public var link: String?

    public init(node: String, devId: String, backing: String, sizeBytes: UInt64, link: String? = nil) {
        (self.node, self.devId, self.backing, self.sizeBytes, self.link) = (node, devId, backing, sizeBytes, link)
    }
}

public struct DetachRequest: Codable, Sendable, Equatable {
    /// A name, /dev/disk/by-blksnap link, node or major:minor.
    public var device: String
    public var live: Bool?
    public var forget: Bool?

    public init(device: String, live: Bool? = nil, forget: Bool? = nil) {
        (self.device, self.live, self.forget) = (device, live, forget)
    }
}

/// The payload of a refused attach or detach: why, for the operator (the
/// reply's result carries the errno).
public struct Refusal: Codable, Sendable, Equatable {
    public var error: String

    public init(error: String) { self.error = error }
}
