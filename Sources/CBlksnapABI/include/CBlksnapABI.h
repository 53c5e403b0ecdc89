/*
 * CBlksnapABI: what Swift cannot import from <blksnap/blk_snap.h> (the
 * _IOW/_IOR command numbers are function-like macros), and the one table of
 * which struct fields are pointers, shared by the Swift frontends and the C
 * preload library so that both ship exactly the same caller memory.
 */
#ifndef CBLKSNAPABI_H
#define CBLKSNAPABI_H

#include <stdint.h>
#include "blksnap/blk_snap.h"
#include "blksnap_control.h"

extern const uint32_t blksnap_ioctl_version;
extern const uint32_t blksnap_ioctl_tracker_remove;
extern const uint32_t blksnap_ioctl_tracker_collect;
extern const uint32_t blksnap_ioctl_tracker_read_cbt_map;
extern const uint32_t blksnap_ioctl_tracker_mark_dirty_blocks;
extern const uint32_t blksnap_ioctl_snapshot_create;
extern const uint32_t blksnap_ioctl_snapshot_destroy;
extern const uint32_t blksnap_ioctl_snapshot_append_storage;
extern const uint32_t blksnap_ioctl_snapshot_take;
extern const uint32_t blksnap_ioctl_snapshot_collect;
extern const uint32_t blksnap_ioctl_snapshot_collect_images;
extern const uint32_t blksnap_ioctl_snapshot_wait_event;
extern const uint32_t blksnap_ioctl_mod;
extern const uint32_t blksnap_ioctl_setlog;
extern const uint32_t blksnap_ioctl_get_sector_state;

/* Which way bytes really move (the encoded direction bits do not say). */
enum blksnap_abi_flow {
	BLKSNAP_ABI_IN = 1,  /* the server reads these bytes from the caller */
	BLKSNAP_ABI_OUT = 2, /* the server may write these bytes to the caller */
};

/*
 * One command's caller memory: the struct at the ioctl argument, and at most
 * one array that a pointer field of that struct designates. The array holds
 * `count * elem_size` bytes, where count is the u32 at count_offset.
 */
struct blksnap_abi_command {
	uint32_t number;         /* the exact ioctl request number */
	const char *name;        /* "VERSION", "SNAPSHOT_CREATE", ... */
	uint32_t arg_size;       /* sizeof the struct at the argument */
	uint32_t arg_flow;       /* BLKSNAP_ABI_IN | BLKSNAP_ABI_OUT */
	int32_t ptr_offset;      /* offset of the pointer field, -1 if none */
	uint32_t count_offset;   /* offset of the u32 element count */
	uint32_t elem_size;      /* bytes per array element */
	uint32_t ptr_flow;       /* BLKSNAP_ABI_IN or BLKSNAP_ABI_OUT */
};

/* The table of every command the interface answers, and its length. */
extern const struct blksnap_abi_command blksnap_abi_commands[];
extern const uint32_t blksnap_abi_command_count;

/* The table row for an exact request number, or NULL (the caller answers
 * ENOTTY). */
const struct blksnap_abi_command *blksnap_abi_find(unsigned long number);

#endif
