/*
 * fake-server.c: a test-only responder for the control protocol
 * (blksnap_control.h), so that the preload shim can be tested without
 * blksnapd. Usage: fake-server SOCKET_PATH [READY_FD]: once it listens, it
 * writes one byte to READY_FD and closes it. One thread per connection.
 *
 * It answers just enough, and checks what the shim ships:
 *   VERSION           writes {1,0,0,0} at the argument (needs its OUT region)
 *   SNAPSHOT_CREATE   echo: id = FNV-1a 64 of the shipped dev-id array, then
 *                     the count as u64; result 0
 *   READ_CBT_MAP      fills buff with ((offset + k) ^ dev_id.mn) & 0xff;
 *                     returns length (needs the OUT array region)
 *   TRACKER_COLLECT   3 trackers: count only for a NULL array, ENOBUFS when
 *                     too small, else the array and the count
 *   MARK_DIRTY_BLOCKS returns the count of the shipped ranges
 *   WAIT_EVENT        takes the first event raised and not yet taken, as
 *                     the module's event queue does: result 0 and code
 *                     FAKE_EVENT_CODE; none within timeout_ms: ENOENT
 *   0xdead0001        drops the connection without a reply (a daemon crash)
 *   0xdead0002        raises an event (on any connection); result 0
 *   anything else     ENOTTY
 * A missing region answers ENODATA (EINVAL for WAIT_EVENT), as the module
 * answers a failed copy. A malformed request closes the connection.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "CBlksnapABI.h"

#define CMD_DROP 0xdead0001u
#define CMD_EVENT 0xdead0002u
#define FAKE_EVENT_CODE blk_snap_event_code_corrupted

/* Events raised and not yet taken by a WAIT_EVENT. */
static pthread_mutex_t events_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t events_raised;
static unsigned events;

struct region {
	uint64_t address;
	uint32_t length, flow;
	unsigned char *bytes; /* IN regions only */
};

struct out_write {
	uint64_t address;
	uint32_t length;
	const void *data;
};

static int read_full(int fd, void *buf, size_t len)
{
	unsigned char *p = buf;
	while (len) {
		ssize_t n = read(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int write_full(int fd, struct iovec *iov, int n)
{
	while (n > 0) {
		ssize_t w = writev(fd, iov, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

static uint64_t fnv1a64(const unsigned char *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

/* The region at addr of exactly len bytes whose flow includes `flow`. */
static struct region *find(struct region *r, uint32_t n, uint64_t addr, uint64_t len, uint32_t flow)
{
	for (uint32_t i = 0; i < n; i++)
		if (r[i].address == addr && r[i].length == len && (r[i].flow & flow) == flow)
			return &r[i];
	return NULL;
}

static int reply(int fd, int32_t result, const struct out_write *w, uint32_t nw)
{
	struct blksnap_control_reply h = { BLKSNAP_CONTROL_MAGIC, result, nw, 0 };
	struct blksnap_control_write wh[4];
	struct iovec iov[9];
	int n = 0;
	iov[n++] = (struct iovec){ &h, sizeof(h) };
	for (uint32_t i = 0; i < nw && i < 4; i++) {
		wh[i] = (struct blksnap_control_write){ w[i].address, w[i].length, 0 };
		iov[n++] = (struct iovec){ &wh[i], sizeof(wh[i]) };
		iov[n++] = (struct iovec){ (void *)w[i].data, w[i].length };
	}
	return write_full(fd, iov, n);
}

static int32_t answer(const struct blksnap_control_request *rq, struct region *r, uint32_t n,
		      struct out_write *w, uint32_t *nw, unsigned char *out, size_t outcap)
{
	uint64_t arg = rq->argument;
	struct region *s, *a;
	*nw = 0;
	switch (rq->command) {
	case IOCTL_BLK_SNAP_VERSION: {
		static const struct blk_snap_version v = { 1, 0, 0, 0 };
		if (!find(r, n, arg, sizeof(v), BLKSNAP_ABI_OUT))
			return -ENODATA;
		w[(*nw)++] = (struct out_write){ arg, sizeof(v), &v };
		return 0;
	}
	case IOCTL_BLK_SNAP_SNAPSHOT_CREATE: {
		struct blk_snap_snapshot_create c;
		if (!(s = find(r, n, arg, sizeof(c), BLKSNAP_ABI_IN | BLKSNAP_ABI_OUT)))
			return -ENODATA;
		memcpy(&c, s->bytes, sizeof(c));
		uint64_t len = (uint64_t)c.count * sizeof(struct blk_snap_dev_t);
		const unsigned char *bytes = (const unsigned char *)"";
		if (c.count) {
			if (!(a = find(r, n, (uintptr_t)c.dev_id_array, len, BLKSNAP_ABI_IN)))
				return -ENODATA;
			bytes = a->bytes;
		}
		uint64_t id[2] = { fnv1a64(bytes, len), c.count };
		memcpy(out, id, sizeof(id));
		w[(*nw)++] = (struct out_write){ arg + offsetof(struct blk_snap_snapshot_create, id), 16, out };
		return 0;
	}
	case IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP: {
		struct blk_snap_tracker_read_cbt_bitmap m;
		if (!(s = find(r, n, arg, sizeof(m), BLKSNAP_ABI_IN)))
			return -ENODATA;
		memcpy(&m, s->bytes, sizeof(m));
		if (m.length == 0)
			return 0;
		if (!find(r, n, (uintptr_t)m.buff, m.length, BLKSNAP_ABI_OUT))
			return -ENODATA;
		unsigned char *data = m.length <= outcap ? out : malloc(m.length);
		if (!data)
			return -ENOMEM;
		for (uint32_t k = 0; k < m.length; k++)
			data[k] = (unsigned char)((m.offset + k) ^ m.dev_id.mn);
		w[(*nw)++] = (struct out_write){ (uintptr_t)m.buff, m.length, data };
		return (int32_t)m.length;
	}
	case IOCTL_BLK_SNAP_TRACKER_COLLECT: {
		struct blk_snap_tracker_collect t;
		static uint32_t three = 3;
		if (!(s = find(r, n, arg, sizeof(t), BLKSNAP_ABI_IN | BLKSNAP_ABI_OUT)))
			return -ENODATA;
		memcpy(&t, s->bytes, sizeof(t));
		if (!t.cbt_info_array) {
			w[(*nw)++] = (struct out_write){ arg, 4, &three };
			return 0;
		}
		if (t.count < 3)
			return -ENOBUFS;
		if (!find(r, n, (uintptr_t)t.cbt_info_array, (uint64_t)t.count * sizeof(struct blk_snap_cbt_info), BLKSNAP_ABI_OUT))
			return -ENODATA;
		struct blk_snap_cbt_info *info = (struct blk_snap_cbt_info *)out;
		memset(info, 0, 3 * sizeof(*info));
		for (uint32_t i = 0; i < 3; i++) {
			info[i].dev_id.mj = i + 1;
			info[i].dev_id.mn = i + 10;
			info[i].blk_size = 65536;
			info[i].device_capacity = (uint64_t)(i + 1) << 30;
			info[i].blk_count = (i + 1) << 14;
			memset(info[i].generation_id, (int)(0xa0 + i), 16);
			info[i].snap_number = (uint8_t)(i + 1);
		}
		w[(*nw)++] = (struct out_write){ (uintptr_t)t.cbt_info_array, 3 * sizeof(*info), info };
		w[(*nw)++] = (struct out_write){ arg, 4, &three };
		return 0;
	}
	case IOCTL_BLK_SNAP_TRACKER_MARK_DIRTY_BLOCKS: {
		struct blk_snap_tracker_mark_dirty_blocks d;
		if (!(s = find(r, n, arg, sizeof(d), BLKSNAP_ABI_IN)))
			return -ENODATA;
		memcpy(&d, s->bytes, sizeof(d));
		if (d.count && !find(r, n, (uintptr_t)d.dirty_blocks_array,
				     (uint64_t)d.count * sizeof(struct blk_snap_block_range), BLKSNAP_ABI_IN))
			return -ENODATA;
		return (int32_t)d.count;
	}
	case IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT: {
		struct blk_snap_snapshot_event e;
		if (!(s = find(r, n, arg, sizeof(e), BLKSNAP_ABI_IN | BLKSNAP_ABI_OUT)))
			return -EINVAL;
		memcpy(&e, s->bytes, sizeof(e));
		/* The module's wait: an event, or ENOENT once timeout_ms ran out
		 * (the tests hold a wait with a long timeout and end it with an
		 * event, so no test depends on how long anything takes). */
		struct timespec deadline;
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += e.timeout_ms / 1000;
		deadline.tv_nsec += (long)(e.timeout_ms % 1000) * 1000000L;
		if (deadline.tv_nsec >= 1000000000L) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000L;
		}
		int waited = 0;
		pthread_mutex_lock(&events_lock);
		while (!events && waited != ETIMEDOUT)
			waited = pthread_cond_timedwait(&events_raised, &events_lock, &deadline);
		int taken = events > 0;
		if (taken)
			events--;
		pthread_mutex_unlock(&events_lock);
		if (!taken)
			return -ENOENT;
		static const uint32_t code = FAKE_EVENT_CODE;
		w[(*nw)++] = (struct out_write){ arg + offsetof(struct blk_snap_snapshot_event, code), sizeof(code), &code };
		return 0;
	}
	case CMD_EVENT:
		pthread_mutex_lock(&events_lock);
		events++;
		pthread_cond_broadcast(&events_raised);
		pthread_mutex_unlock(&events_lock);
		return 0;
	default:
		return -ENOTTY;
	}
}

static void *serve(void *p)
{
	int fd = (int)(intptr_t)p;
	unsigned char *out = malloc(1 << 16);
	for (;;) {
		struct blksnap_control_request rq;
		if (read_full(fd, &rq, sizeof(rq)) != 0)
			break;
		if (rq.magic != BLKSNAP_CONTROL_MAGIC || rq.region_count > 2) {
			fprintf(stderr, "fake-server: malformed request (magic %#x, %u regions)\n",
				rq.magic, rq.region_count);
			break;
		}
		if (rq.command == CMD_DROP)
			break;
		struct region r[2];
		memset(r, 0, sizeof(r));
		uint32_t n = 0;
		int ok = 1;
		uint64_t total = 0;
		for (; n < rq.region_count; n++) {
			struct blksnap_control_region h;
			if (read_full(fd, &h, sizeof(h)) != 0) {
				ok = 0;
				break;
			}
			total += h.length;
			if (total > BLKSNAP_CONTROL_MAX_BYTES) {
				ok = 0;
				break;
			}
			r[n] = (struct region){ h.address, h.length, h.flow, NULL };
			if (h.flow & BLKSNAP_ABI_IN) {
				r[n].bytes = malloc(h.length ? h.length : 1);
				if (!r[n].bytes || read_full(fd, r[n].bytes, h.length) != 0) {
					n++;
					ok = 0;
					break;
				}
			}
		}
		if (ok && rq.type != BLKSNAP_CONTROL_IOCTL) {
			/* Not used by the shim: skip any payload, answer EINVAL. */
			unsigned char sink[4096];
			for (uint32_t left = rq.payload_length; ok && left;) {
				uint32_t k = left < sizeof(sink) ? left : (uint32_t)sizeof(sink);
				ok = read_full(fd, sink, k) == 0;
				left -= k;
			}
			ok = ok && reply(fd, -EINVAL, NULL, 0) == 0;
		} else if (ok) {
			struct out_write w[4];
			uint32_t nw = 0;
			int32_t res = answer(&rq, r, n, w, &nw, out, 1 << 16);
			ok = reply(fd, res, w, nw) == 0;
			for (uint32_t i = 0; i < nw; i++)
				if (w[i].data != out && w[i].length > (1u << 16))
					free((void *)w[i].data);
		}
		for (uint32_t i = 0; i < n; i++)
			free(r[i].bytes);
		if (!ok)
			break;
	}
	free(out);
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 2 && argc != 3) {
		fprintf(stderr, "usage: fake-server SOCKET_PATH [READY_FD]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&events_raised, &ca);
	pthread_condattr_destroy(&ca);
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(argv[1]) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "fake-server: path too long\n");
		return 2;
	}
	strcpy(sa.sun_path, argv[1]);
	unlink(argv[1]);
	int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(ls, 128) != 0) {
		perror("fake-server");
		return 1;
	}
	if (argc == 3) {
		/* The test waits for this byte, not for time to pass. */
		int ready = atoi(argv[2]);
		if (write(ready, "r", 1) != 1) {
			perror("fake-server: ready");
			return 1;
		}
		close(ready);
	}
	for (;;) {
		int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("fake-server: accept");
			return 1;
		}
		pthread_t t;
		pthread_attr_t at;
		pthread_attr_init(&at);
		pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&t, &at, serve, (void *)(intptr_t)c) != 0)
			close(c);
		pthread_attr_destroy(&at);
	}
}
