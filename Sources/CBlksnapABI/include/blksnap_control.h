/*
 * blksnap_control.h: the protocol on blksnapd's control socket
 * (/run/blksnap/control.sock, or $BLKSNAP_CONTROL_SOCKET), spoken by the
 * LD_PRELOAD shim (C) and blksnapctl, and served by blksnapd (Swift).
 *
 * Little-endian, fixed-size headers, one request then one reply, in order,
 * on a stream socket. The peer must be root (SO_PEERCRED); others get
 * -EACCES for every request.
 *
 * IOCTL request: header, then `region_count` regions, each a region header
 * followed by `length` bytes of the caller's memory when `flow` has
 * BLKSNAP_ABI_IN (an OUT-only region carries no bytes: it only says that
 * the caller can take `length` bytes back at `address`). The regions are the
 * struct at the ioctl argument and the array its pointer field designates,
 * as the shared table (CBlksnapABI.h) describes; memory the caller cannot
 * read is simply not shipped, and the dispatcher answers as the module does
 * for a failed copy.
 *
 * Reply: header, then `write_count` writes (a write header and `length`
 * bytes to copy into the caller at `address`), then `payload_length` bytes
 * of payload (STATUS: JSON; ATTACH: the node and major:minor as JSON).
 */
#ifndef BLKSNAP_CONTROL_H
#define BLKSNAP_CONTROL_H

#include <stdint.h>

#define BLKSNAP_CONTROL_MAGIC 0x534b4c42u /* "BLKS" */
#define BLKSNAP_CONTROL_SOCKET "/run/blksnap/control.sock"
#define BLKSNAP_CONTROL_SOCKET_ENV "BLKSNAP_CONTROL_SOCKET"
/* No request may carry more than this many bytes of regions or payload. */
#define BLKSNAP_CONTROL_MAX_BYTES (256u << 20)

enum blksnap_control_type {
	BLKSNAP_CONTROL_IOCTL = 1,  /* one ioctl of /dev/blksnap */
	BLKSNAP_CONTROL_STATUS = 2, /* blksnapctl status: JSON payload */
	BLKSNAP_CONTROL_ATTACH = 3, /* blksnapctl attach: request payload is JSON */
	BLKSNAP_CONTROL_DETACH = 4, /* blksnapctl detach: request payload is JSON */
};

struct blksnap_control_request {
	uint32_t magic;
	uint32_t type;           /* enum blksnap_control_type */
	uint32_t command;        /* IOCTL: the ioctl request number */
	uint32_t region_count;   /* IOCTL: regions that follow */
	uint64_t argument;       /* IOCTL: the ioctl's third argument */
	uint32_t payload_length; /* other types: bytes of payload that follow */
	uint32_t reserved;
};

struct blksnap_control_region {
	uint64_t address;
	uint32_t length;
	uint32_t flow; /* BLKSNAP_ABI_IN | BLKSNAP_ABI_OUT */
};

struct blksnap_control_reply {
	uint32_t magic;
	int32_t result;          /* >= 0: ioctl's return value; < 0: -errno */
	uint32_t write_count;
	uint32_t payload_length;
};

struct blksnap_control_write {
	uint64_t address;
	uint32_t length;
	uint32_t reserved;
};

_Static_assert(sizeof(struct blksnap_control_request) == 32, "request header");
_Static_assert(sizeof(struct blksnap_control_region) == 16, "region header");
_Static_assert(sizeof(struct blksnap_control_reply) == 16, "reply header");
_Static_assert(sizeof(struct blksnap_control_write) == 16, "write header");

#endif
