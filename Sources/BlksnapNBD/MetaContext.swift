import BlksnapEngine

/// A metadata context NBD_CMD_BLOCK_STATUS can report, chosen per
/// connection with NBD_OPT_SET_META_CONTEXT (which numbers them).
///
/// `base:allocation` is the spec's own. A `BlockDevice` cannot tell holes
/// from data, so the whole requested range is one extent with flags 0
/// ("allocated, or unknown"), which the spec lets a server always answer.
/// `blksnap:changed-since:N` is ours; `ChangedBlocksContext` defines it.
public enum MetaContext: Hashable, Sendable, CustomStringConvertible {
    case baseAllocation
    case changedSince(UInt8)

    public static let baseAllocationName = "base:allocation"

    public var name: String {
        switch self {
        case .baseAllocation: Self.baseAllocationName
        case .changedSince(let n): ChangedBlocksContext.name(since: n)
        }
    }

    public var description: String { name }

    /// The context a full name denotes, or nil.
    public init?(name: String) {
        if name == Self.baseAllocationName {
            self = .baseAllocation
        } else if let n = ChangedBlocksContext.parse(name) {
            self = .changedSince(n)
        } else {
            return nil
        }
    }

    /// Whether this export can answer the context.
    func isAvailable(on export: Export) -> Bool {
        switch self {
        case .baseAllocation: true
        case .changedSince: export.changes != nil
        }
    }

    /// NBD_OPT_SET_META_CONTEXT takes exact names only, as nbdkit does:
    /// a selection is a promise to answer, so it must be unambiguous.
    static func select(query: String, export: Export) -> MetaContext? {
        guard let context = MetaContext(name: query), context.isAvailable(on: export) else { return nil }
        return context
    }

    /// NBD_OPT_LIST_META_CONTEXT: an exact name, or a namespace (or the
    /// `blksnap:changed-since:` stem) standing for all its contexts.
    static func list(query: String, export: Export) -> [MetaContext] {
        switch query {
        case "base:", baseAllocationName:
            return [.baseAllocation]
        case ChangedBlocksContext.namespace, ChangedBlocksContext.prefix:
            return ChangedBlocksContext.listed(export).map { .changedSince($0) }
        default:
            return select(query: query, export: export).map { [$0] } ?? []
        }
    }

    /// Every context of the export, for a LIST with no query.
    static func all(_ export: Export) -> [MetaContext] {
        [.baseAllocation] + ChangedBlocksContext.listed(export).map { .changedSince($0) }
    }

    /// The extents of `offset..<offset+length`, which the caller has
    /// checked lies within the device.
    func extents(export: Export, offset: UInt64, length: UInt32, reqOne: Bool) throws(BlksnapError) -> [Extent] {
        switch self {
        case .baseAllocation:
            return [Extent(length: length, flags: 0)]
        case .changedSince(let n):
            return try ChangedBlocksContext.extents(export: export, since: n, offset: offset, length: length,
                                                    reqOne: reqOne)
        }
    }
}
