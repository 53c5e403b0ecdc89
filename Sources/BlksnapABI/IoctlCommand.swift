import CBlksnapABI

/// Every command of the v1 interface, with its exact request number.
///
/// The v1 module looks only at `_IOC_NR` and crashes or misroutes on some
/// numbers; we accept exactly the numbers of `<blksnap/blk_snap.h>` and
/// answer ENOTTY to anything else.
public enum IoctlCommand: CaseIterable, Sendable, CustomStringConvertible {
    case version
    case trackerRemove
    case trackerCollect
    case trackerReadCbtMap
    case trackerMarkDirtyBlocks
    case snapshotCreate
    case snapshotDestroy
    case snapshotAppendStorage
    case snapshotTake
    case snapshotCollect
    case snapshotCollectImages
    case snapshotWaitEvent
    case mod
    case setlog
    case getSectorState

    /// The request number a caller passes to ioctl(2).
    public var number: UInt32 {
        switch self {
        case .version: blksnap_ioctl_version
        case .trackerRemove: blksnap_ioctl_tracker_remove
        case .trackerCollect: blksnap_ioctl_tracker_collect
        case .trackerReadCbtMap: blksnap_ioctl_tracker_read_cbt_map
        case .trackerMarkDirtyBlocks: blksnap_ioctl_tracker_mark_dirty_blocks
        case .snapshotCreate: blksnap_ioctl_snapshot_create
        case .snapshotDestroy: blksnap_ioctl_snapshot_destroy
        case .snapshotAppendStorage: blksnap_ioctl_snapshot_append_storage
        case .snapshotTake: blksnap_ioctl_snapshot_take
        case .snapshotCollect: blksnap_ioctl_snapshot_collect
        case .snapshotCollectImages: blksnap_ioctl_snapshot_collect_images
        case .snapshotWaitEvent: blksnap_ioctl_snapshot_wait_event
        case .mod: blksnap_ioctl_mod
        case .setlog: blksnap_ioctl_setlog
        case .getSectorState: blksnap_ioctl_get_sector_state
        }
    }

    public init?(number: UInt32) {
        guard let command = IoctlCommand.allCases.first(where: { $0.number == number }) else { return nil }
        self = command
    }

    /// The row of the shared C table: the struct size and its pointer field.
    public var layout: blksnap_abi_command {
        blksnap_abi_find(UInt(number))!.pointee
    }

    /// The upstream name, as logs and the tools' messages spell it.
    public var description: String { String(cString: layout.name) }
}
