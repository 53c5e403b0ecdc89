/* SPDX-License-Identifier: GPL-2.0 */
/*
 * blk_snap.h: the blksnap v1 control interface, as seen from user space.
 *
 * Written for blksnap-swift from the interface description in
 * shared/ABI-v1.md. Names, numbers, sizes and offsets are those of the 2022
 * blksnap module, so code written for the original compiles against this
 * header unchanged; every size and offset is pinned by a static_assert below.
 *
 * This header is plain C11 for user space: uuid_t comes from libuuid, the
 * ioctl macros from <sys/ioctl.h>, the __u* types from the UAPI
 * <linux/types.h>, and nothing from kernel-only headers.
 * Layouts are for LP64 with natural alignment and no packing.
 */
#ifndef __LINUX_BLK_SNAP_H
#define __LINUX_BLK_SNAP_H

#include <assert.h>
#include <stddef.h>
#include <linux/types.h>
#include <sys/ioctl.h>
#include <uuid/uuid.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The optional commands (MOD, SETLOG, GET_SECTOR_STATE) are always served by
 * blksnap-swift, and the upstream tools always define this. */
#ifndef BLK_SNAP_MODIFICATION
#define BLK_SNAP_MODIFICATION
#endif

#define BLK_SNAP_MODULE_NAME "blksnap"
#define BLK_SNAP_IMAGE_NAME "blksnap-image"
#define BLK_SNAP 'V'

#ifdef BLK_SNAP_MODIFICATION
#define IOCTL_MOD 32
#endif

/* Command numbers: the _IOC_NR field of every IOCTL_BLK_SNAP_* below. */
enum blk_snap_ioctl {
	blk_snap_ioctl_version,
	blk_snap_ioctl_tracker_remove,
	blk_snap_ioctl_tracker_collect,
	blk_snap_ioctl_tracker_read_cbt_map,
	blk_snap_ioctl_tracker_mark_dirty_blocks,
	blk_snap_ioctl_snapshot_create,
	blk_snap_ioctl_snapshot_destroy,
	blk_snap_ioctl_snapshot_append_storage,
	blk_snap_ioctl_snapshot_take,
	blk_snap_ioctl_snapshot_collect,
	blk_snap_ioctl_snapshot_collect_images,
	blk_snap_ioctl_snapshot_wait_event,
	blk_snap_ioctl_end,
#ifdef BLK_SNAP_MODIFICATION
	blk_snap_ioctl_mod = IOCTL_MOD,
	blk_snap_ioctl_setlog,
	blk_snap_ioctl_get_sector_state,
	blk_snap_ioctl_end_mod
#endif
};

/* VERSION: out. */
struct blk_snap_version {
	__u16 major;
	__u16 minor;
	__u16 revision;
	__u16 build;
};
#define IOCTL_BLK_SNAP_VERSION \
	_IOW(BLK_SNAP, blk_snap_ioctl_version, struct blk_snap_version)

#ifdef BLK_SNAP_MODIFICATION
/* Bit numbers in blk_snap_mod.compatibility_flags. */
enum blk_snap_compat_flags {
	blk_snap_compat_flag_debug_sector_state,
	blk_snap_compat_flag_setlog,
	blk_snap_compat_flags_end
};
static_assert(blk_snap_compat_flags_end <= 64,
	      "There are too many compatibility flags.");

#define BLK_SNAP_MOD_NAME_LIMIT 32

/* MOD: out. */
struct blk_snap_mod {
	__u64 compatibility_flags;
	__u8 name[BLK_SNAP_MOD_NAME_LIMIT];
};
#define IOCTL_BLK_SNAP_MOD \
	_IOW(BLK_SNAP, blk_snap_ioctl_mod, struct blk_snap_mod)
#endif

/* A block device as major(st_rdev):minor(st_rdev). */
struct blk_snap_dev_t {
	__u32 mj;
	__u32 mn;
};

/* TRACKER_REMOVE: in. */
struct blk_snap_tracker_remove {
	struct blk_snap_dev_t dev_id;
};
#define IOCTL_BLK_SNAP_TRACKER_REMOVE \
	_IOW(BLK_SNAP, blk_snap_ioctl_tracker_remove, \
	     struct blk_snap_tracker_remove)

/* One tracker as TRACKER_COLLECT reports it; device_capacity is in bytes,
 * snap_number is the number of the last snapshot taken (the read map's). */
struct blk_snap_cbt_info {
	struct blk_snap_dev_t dev_id;
	__u32 blk_size;
	__u64 device_capacity;
	__u32 blk_count;
	uuid_t generation_id;
	__u8 snap_number;
};

/* TRACKER_COLLECT: count in and out; the array at cbt_info_array out.
 * A NULL array asks for the count only. */
struct blk_snap_tracker_collect {
	__u32 count;
	struct blk_snap_cbt_info *cbt_info_array;
};
#define IOCTL_BLK_SNAP_TRACKER_COLLECT \
	_IOW(BLK_SNAP, blk_snap_ioctl_tracker_collect, \
	     struct blk_snap_tracker_collect)

/* TRACKER_READ_CBT_MAP: in; the map bytes out at buff; the ioctl returns
 * the number of bytes copied. offset and length are in bytes of the map. */
struct blk_snap_tracker_read_cbt_bitmap {
	struct blk_snap_dev_t dev_id;
	__u32 offset;
	__u32 length;
	__u8 *buff;
};
#define IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP \
	_IOR(BLK_SNAP, blk_snap_ioctl_tracker_read_cbt_map, \
	     struct blk_snap_tracker_read_cbt_bitmap)

/* A range of 512-byte sectors. */
struct blk_snap_block_range {
	__u64 sector_offset;
	__u64 sector_count;
};

/* TRACKER_MARK_DIRTY_BLOCKS: in, with the array at dirty_blocks_array. */
struct blk_snap_tracker_mark_dirty_blocks {
	struct blk_snap_dev_t dev_id;
	__u32 count;
	struct blk_snap_block_range *dirty_blocks_array;
};
#define IOCTL_BLK_SNAP_TRACKER_MARK_DIRTY_BLOCKS \
	_IOR(BLK_SNAP, blk_snap_ioctl_tracker_mark_dirty_blocks, \
	     struct blk_snap_tracker_mark_dirty_blocks)

/* SNAPSHOT_CREATE: count and dev_id_array in; id out. */
struct blk_snap_snapshot_create {
	__u32 count;
	struct blk_snap_dev_t *dev_id_array;
	uuid_t id;
};
#define IOCTL_BLK_SNAP_SNAPSHOT_CREATE \
	_IOW(BLK_SNAP, blk_snap_ioctl_snapshot_create, \
	     struct blk_snap_snapshot_create)

/* SNAPSHOT_DESTROY: in. */
struct blk_snap_snapshot_destroy {
	uuid_t id;
};
#define IOCTL_BLK_SNAP_SNAPSHOT_DESTROY \
	_IOR(BLK_SNAP, blk_snap_ioctl_snapshot_destroy, \
	     struct blk_snap_snapshot_destroy)

/* SNAPSHOT_APPEND_STORAGE: in, with the sector ranges of dev_id at ranges. */
struct blk_snap_snapshot_append_storage {
	uuid_t id;
	struct blk_snap_dev_t dev_id;
	__u32 count;
	struct blk_snap_block_range *ranges;
};
#define IOCTL_BLK_SNAP_SNAPSHOT_APPEND_STORAGE \
	_IOW(BLK_SNAP, blk_snap_ioctl_snapshot_append_storage, \
	     struct blk_snap_snapshot_append_storage)

/* SNAPSHOT_TAKE: in. */
struct blk_snap_snapshot_take {
	uuid_t id;
};
#define IOCTL_BLK_SNAP_SNAPSHOT_TAKE \
	_IOR(BLK_SNAP, blk_snap_ioctl_snapshot_take, \
	     struct blk_snap_snapshot_take)

/* SNAPSHOT_COLLECT: count in and out; ids out. A NULL ids asks for the count. */
struct blk_snap_snapshot_collect {
	__u32 count;
	uuid_t *ids;
};
#define IOCTL_BLK_SNAP_SNAPSHOT_COLLECT \
	_IOW(BLK_SNAP, blk_snap_ioctl_snapshot_collect, \
	     struct blk_snap_snapshot_collect)

/* One image: the original device and the snapshot image device. */
struct blk_snap_image_info {
	struct blk_snap_dev_t orig_dev_id;
	struct blk_snap_dev_t image_dev_id;
};

/* SNAPSHOT_COLLECT_IMAGES: id and count in; count and the array out. */
struct blk_snap_snapshot_collect_images {
	uuid_t id;
	__u32 count;
	struct blk_snap_image_info *image_info_array;
};
#define IOCTL_BLK_SNAP_SNAPSHOT_COLLECT_IMAGES \
	_IOW(BLK_SNAP, blk_snap_ioctl_snapshot_collect_images, \
	     struct blk_snap_snapshot_collect_images)

enum blk_snap_event_codes {
	/* The difference storage runs low: data is blk_snap_event_low_free_space. */
	blk_snap_event_code_low_free_space,
	/* The snapshot can no longer hold its images: data is blk_snap_event_corrupted. */
	blk_snap_event_code_corrupted,
};

/* SNAPSHOT_WAIT_EVENT: id and timeout_ms in; code, time_label (ns since
 * boot) and data out. The struct fills one page. */
struct blk_snap_snapshot_event {
	uuid_t id;
	__u32 timeout_ms;
	__u32 code;
	__s64 time_label;
	__u8 data[4096 - 32];
};
static_assert(sizeof(struct blk_snap_snapshot_event) == 4096,
	      "The size struct blk_snap_snapshot_event should be equal to the size of the page.");
#define IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT \
	_IOW(BLK_SNAP, blk_snap_ioctl_snapshot_wait_event, \
	     struct blk_snap_snapshot_event)

struct blk_snap_event_low_free_space {
	__u64 requested_nr_sect;
};

struct blk_snap_event_corrupted {
	struct blk_snap_dev_t orig_dev_id;
	__s32 err_code;
};

#ifdef BLK_SNAP_MODIFICATION
/* SETLOG: in. A NULL filepath turns logging to a file off. */
struct blk_snap_setlog {
	__s32 tz_minuteswest;
	__u32 level;
	__u32 filepath_size;
	__u8 *filepath;
};
#define IOCTL_BLK_SNAP_SETLOG \
	_IOW(BLK_SNAP, blk_snap_ioctl_setlog, struct blk_snap_setlog)

/* chunk_state bits of blk_snap_sector_state. */
#define BLK_SNAP_CHUNK_ST_FAILED (1u << 0)
#define BLK_SNAP_CHUNK_ST_DIRTY (1u << 1)
#define BLK_SNAP_CHUNK_ST_BUFFER_READY (1u << 2)
#define BLK_SNAP_CHUNK_ST_STORE_READY (1u << 3)
#define BLK_SNAP_CHUNK_ST_LOADING (1u << 4)
#define BLK_SNAP_CHUNK_ST_STORING (1u << 5)

struct blk_snap_sector_state {
	__u8 snap_number_prev;
	__u8 snap_number_curr;
	__u32 chunk_state;
};

/* GET_SECTOR_STATE: image_dev_id and sector in; state out. */
struct blk_snap_get_sector_state {
	struct blk_snap_dev_t image_dev_id;
	__u64 sector;
	struct blk_snap_sector_state state;
};
#define IOCTL_BLK_SNAP_GET_SECTOR_STATE \
	_IOW(BLK_SNAP, blk_snap_ioctl_get_sector_state, \
	     struct blk_snap_get_sector_state)
#endif /* BLK_SNAP_MODIFICATION */

/* The layout pins: a wrong size or offset here breaks every existing tool. */
#define BLK_SNAP_PIN(type, size) \
	static_assert(sizeof(struct type) == (size), #type " size")
#define BLK_SNAP_PIN_AT(type, field, offset) \
	static_assert(offsetof(struct type, field) == (offset), #type "." #field)

BLK_SNAP_PIN(blk_snap_version, 8);
BLK_SNAP_PIN_AT(blk_snap_version, minor, 2);
BLK_SNAP_PIN_AT(blk_snap_version, revision, 4);
BLK_SNAP_PIN_AT(blk_snap_version, build, 6);
BLK_SNAP_PIN(blk_snap_dev_t, 8);
BLK_SNAP_PIN_AT(blk_snap_dev_t, mn, 4);
BLK_SNAP_PIN(blk_snap_tracker_remove, 8);
BLK_SNAP_PIN(blk_snap_cbt_info, 48);
BLK_SNAP_PIN_AT(blk_snap_cbt_info, blk_size, 8);
BLK_SNAP_PIN_AT(blk_snap_cbt_info, device_capacity, 16);
BLK_SNAP_PIN_AT(blk_snap_cbt_info, blk_count, 24);
BLK_SNAP_PIN_AT(blk_snap_cbt_info, generation_id, 28);
BLK_SNAP_PIN_AT(blk_snap_cbt_info, snap_number, 44);
BLK_SNAP_PIN(blk_snap_tracker_collect, 16);
BLK_SNAP_PIN_AT(blk_snap_tracker_collect, cbt_info_array, 8);
BLK_SNAP_PIN(blk_snap_tracker_read_cbt_bitmap, 24);
BLK_SNAP_PIN_AT(blk_snap_tracker_read_cbt_bitmap, offset, 8);
BLK_SNAP_PIN_AT(blk_snap_tracker_read_cbt_bitmap, length, 12);
BLK_SNAP_PIN_AT(blk_snap_tracker_read_cbt_bitmap, buff, 16);
BLK_SNAP_PIN(blk_snap_block_range, 16);
BLK_SNAP_PIN_AT(blk_snap_block_range, sector_count, 8);
BLK_SNAP_PIN(blk_snap_tracker_mark_dirty_blocks, 24);
BLK_SNAP_PIN_AT(blk_snap_tracker_mark_dirty_blocks, count, 8);
BLK_SNAP_PIN_AT(blk_snap_tracker_mark_dirty_blocks, dirty_blocks_array, 16);
BLK_SNAP_PIN(blk_snap_snapshot_create, 32);
BLK_SNAP_PIN_AT(blk_snap_snapshot_create, dev_id_array, 8);
BLK_SNAP_PIN_AT(blk_snap_snapshot_create, id, 16);
BLK_SNAP_PIN(blk_snap_snapshot_destroy, 16);
BLK_SNAP_PIN(blk_snap_snapshot_append_storage, 40);
BLK_SNAP_PIN_AT(blk_snap_snapshot_append_storage, dev_id, 16);
BLK_SNAP_PIN_AT(blk_snap_snapshot_append_storage, count, 24);
BLK_SNAP_PIN_AT(blk_snap_snapshot_append_storage, ranges, 32);
BLK_SNAP_PIN(blk_snap_snapshot_take, 16);
BLK_SNAP_PIN(blk_snap_snapshot_collect, 16);
BLK_SNAP_PIN_AT(blk_snap_snapshot_collect, ids, 8);
BLK_SNAP_PIN(blk_snap_image_info, 16);
BLK_SNAP_PIN_AT(blk_snap_image_info, image_dev_id, 8);
BLK_SNAP_PIN(blk_snap_snapshot_collect_images, 32);
BLK_SNAP_PIN_AT(blk_snap_snapshot_collect_images, count, 16);
BLK_SNAP_PIN_AT(blk_snap_snapshot_collect_images, image_info_array, 24);
BLK_SNAP_PIN_AT(blk_snap_snapshot_event, timeout_ms, 16);
BLK_SNAP_PIN_AT(blk_snap_snapshot_event, code, 20);
BLK_SNAP_PIN_AT(blk_snap_snapshot_event, time_label, 24);
BLK_SNAP_PIN_AT(blk_snap_snapshot_event, data, 32);
BLK_SNAP_PIN(blk_snap_event_low_free_space, 8);
BLK_SNAP_PIN(blk_snap_event_corrupted, 12);
BLK_SNAP_PIN_AT(blk_snap_event_corrupted, err_code, 8);
#ifdef BLK_SNAP_MODIFICATION
BLK_SNAP_PIN(blk_snap_mod, 40);
BLK_SNAP_PIN_AT(blk_snap_mod, name, 8);
BLK_SNAP_PIN(blk_snap_setlog, 24);
BLK_SNAP_PIN_AT(blk_snap_setlog, level, 4);
BLK_SNAP_PIN_AT(blk_snap_setlog, filepath_size, 8);
BLK_SNAP_PIN_AT(blk_snap_setlog, filepath, 16);
BLK_SNAP_PIN(blk_snap_sector_state, 8);
BLK_SNAP_PIN_AT(blk_snap_sector_state, chunk_state, 4);
BLK_SNAP_PIN(blk_snap_get_sector_state, 24);
BLK_SNAP_PIN_AT(blk_snap_get_sector_state, sector, 8);
BLK_SNAP_PIN_AT(blk_snap_get_sector_state, state, 16);
#endif
#undef BLK_SNAP_PIN
#undef BLK_SNAP_PIN_AT

#ifdef __cplusplus
}
#endif

#endif /* __LINUX_BLK_SNAP_H */
