#include "CBlksnapABI.h"

#include <stddef.h>

const uint32_t blksnap_ioctl_version = IOCTL_BLK_SNAP_VERSION;
const uint32_t blksnap_ioctl_tracker_remove = IOCTL_BLK_SNAP_TRACKER_REMOVE;
const uint32_t blksnap_ioctl_tracker_collect = IOCTL_BLK_SNAP_TRACKER_COLLECT;
const uint32_t blksnap_ioctl_tracker_read_cbt_map = IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP;
const uint32_t blksnap_ioctl_tracker_mark_dirty_blocks = IOCTL_BLK_SNAP_TRACKER_MARK_DIRTY_BLOCKS;
const uint32_t blksnap_ioctl_snapshot_create = IOCTL_BLK_SNAP_SNAPSHOT_CREATE;
const uint32_t blksnap_ioctl_snapshot_destroy = IOCTL_BLK_SNAP_SNAPSHOT_DESTROY;
const uint32_t blksnap_ioctl_snapshot_append_storage = IOCTL_BLK_SNAP_SNAPSHOT_APPEND_STORAGE;
const uint32_t blksnap_ioctl_snapshot_take = IOCTL_BLK_SNAP_SNAPSHOT_TAKE;
const uint32_t blksnap_ioctl_snapshot_collect = IOCTL_BLK_SNAP_SNAPSHOT_COLLECT;
const uint32_t blksnap_ioctl_snapshot_collect_images = IOCTL_BLK_SNAP_SNAPSHOT_COLLECT_IMAGES;
const uint32_t blksnap_ioctl_snapshot_wait_event = IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT;
const uint32_t blksnap_ioctl_mod = IOCTL_BLK_SNAP_MOD;
const uint32_t blksnap_ioctl_setlog = IOCTL_BLK_SNAP_SETLOG;
const uint32_t blksnap_ioctl_get_sector_state = IOCTL_BLK_SNAP_GET_SECTOR_STATE;

#define IN BLKSNAP_ABI_IN
#define OUT BLKSNAP_ABI_OUT
#define NOPTR -1, 0, 0, 0
#define ARRAY(type, ptr, count, elem, flow) \
	(int32_t)offsetof(struct type, ptr), offsetof(struct type, count), \
	sizeof(elem), flow

const struct blksnap_abi_command blksnap_abi_commands[] = {
	{ IOCTL_BLK_SNAP_VERSION, "VERSION",
	  sizeof(struct blk_snap_version), OUT, NOPTR },
	{ IOCTL_BLK_SNAP_TRACKER_REMOVE, "TRACKER_REMOVE",
	  sizeof(struct blk_snap_tracker_remove), IN, NOPTR },
	{ IOCTL_BLK_SNAP_TRACKER_COLLECT, "TRACKER_COLLECT",
	  sizeof(struct blk_snap_tracker_collect), IN | OUT,
	  ARRAY(blk_snap_tracker_collect, cbt_info_array, count,
		struct blk_snap_cbt_info, OUT) },
	{ IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, "TRACKER_READ_CBT_MAP",
	  sizeof(struct blk_snap_tracker_read_cbt_bitmap), IN,
	  ARRAY(blk_snap_tracker_read_cbt_bitmap, buff, length, __u8, OUT) },
	{ IOCTL_BLK_SNAP_TRACKER_MARK_DIRTY_BLOCKS, "TRACKER_MARK_DIRTY_BLOCKS",
	  sizeof(struct blk_snap_tracker_mark_dirty_blocks), IN,
	  ARRAY(blk_snap_tracker_mark_dirty_blocks, dirty_blocks_array, count,
		struct blk_snap_block_range, IN) },
	{ IOCTL_BLK_SNAP_SNAPSHOT_CREATE, "SNAPSHOT_CREATE",
	  sizeof(struct blk_snap_snapshot_create), IN | OUT,
	  ARRAY(blk_snap_snapshot_create, dev_id_array, count,
		struct blk_snap_dev_t, IN) },
	{ IOCTL_BLK_SNAP_SNAPSHOT_DESTROY, "SNAPSHOT_DESTROY",
	  sizeof(struct blk_snap_snapshot_destroy), IN, NOPTR },
	{ IOCTL_BLK_SNAP_SNAPSHOT_APPEND_STORAGE, "SNAPSHOT_APPEND_STORAGE",
	  sizeof(struct blk_snap_snapshot_append_storage), IN,
	  ARRAY(blk_snap_snapshot_append_storage, ranges, count,
		struct blk_snap_block_range, IN) },
	{ IOCTL_BLK_SNAP_SNAPSHOT_TAKE, "SNAPSHOT_TAKE",
	  sizeof(struct blk_snap_snapshot_take), IN, NOPTR },
	{ IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, "SNAPSHOT_COLLECT",
	  sizeof(struct blk_snap_snapshot_collect), IN | OUT,
	  ARRAY(blk_snap_snapshot_collect, ids, count, uuid_t, OUT) },
	{ IOCTL_BLK_SNAP_SNAPSHOT_COLLECT_IMAGES, "SNAPSHOT_COLLECT_IMAGES",
	  sizeof(struct blk_snap_snapshot_collect_images), IN | OUT,
	  ARRAY(blk_snap_snapshot_collect_images, image_info_array, count,
		struct blk_snap_image_info, OUT) },
	{ IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, "SNAPSHOT_WAIT_EVENT",
	  sizeof(struct blk_snap_snapshot_event), IN | OUT, NOPTR },
	{ IOCTL_BLK_SNAP_MOD, "MOD", sizeof(struct blk_snap_mod), OUT, NOPTR },
	{ IOCTL_BLK_SNAP_SETLOG, "SETLOG",
	  sizeof(struct blk_snap_setlog), IN,
	  ARRAY(blk_snap_setlog, filepath, filepath_size, __u8, IN) },
	{ IOCTL_BLK_SNAP_GET_SECTOR_STATE, "GET_SECTOR_STATE",
	  sizeof(struct blk_snap_get_sector_state), IN | OUT, NOPTR },
};

const uint32_t blksnap_abi_command_count =
	sizeof(blksnap_abi_commands) / sizeof(blksnap_abi_commands[0]);

const struct blksnap_abi_command *blksnap_abi_find(unsigned long number)
{
	for (uint32_t i = 0; i < blksnap_abi_command_count; i++)
		if (blksnap_abi_commands[i].number == number)
			return &blksnap_abi_commands[i];
	return NULL;
}
