/*
 * blksnap-preload.c: an LD_PRELOAD shim that gives a process /dev/blksnap
 * without the kernel module (and without the CUSE device): open of the
 * control device connects to blksnapd's control socket, and every ioctl on
 * that fd travels as one request of the protocol in blksnap_control.h.
 *
 * Which caller memory a command ships, and which way it flows, comes from
 * the table the daemon also uses (CBlksnapABI.h, abi.c compiled in here).
 * Caller memory is read and written with process_vm_readv/writev on our own
 * pid, so a bad pointer becomes an errno (ENODATA, as the module answers a
 * failed copy), never a crash.
 *
 * When /dev/blksnap exists as a character device (the module, or blksnapd's
 * CUSE device), every call passes through untouched; this is decided per
 * open call.
 *
 * Plain C, no Swift runtime; only the interposed functions are exported.
 */
#define _GNU_SOURCE
#undef _FORTIFY_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "CBlksnapABI.h"

#define EXPORT __attribute__((visibility("default")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

#define BLKSNAP_DEVICE_PATH "/dev/blksnap"

/* Per-connection scratch: request bytes that fit go here, and replies are
 * read through it; larger IN arrays are malloc'ed. */
#define SCRATCH_SIZE (64u << 10)
/* A sane bound on writes in one reply (the table has at most two regions). */
#define MAX_WRITES 4096u
/* Pages probed per process_vm_readv when checking an OUT array. */
#define PROBE_BATCH 256

/* ---------------------------------------------------------------------- */
/* The real functions, resolved lazily with dlsym(RTLD_NEXT). Each slot is
 * written at most with the same value, so a racing double resolution is
 * harmless and no lock (or pthread_once, which could recurse) is needed. */

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*open2_fn)(const char *, int);
typedef int (*openat2_fn)(int, const char *, int);
typedef int (*close_fn)(int);
typedef int (*ioctl_fn)(int, unsigned long, ...);
typedef int (*dup_fn)(int);
typedef int (*dup2_fn)(int, int);
typedef int (*dup3_fn)(int, int, int);
typedef int (*fcntl_fn)(int, int, ...);

enum {
	R_OPEN, R_OPEN64, R_OPENAT, R_OPENAT64,
	R_OPEN_2, R_OPEN64_2, R_OPENAT_2, R_OPENAT64_2,
	R_CLOSE, R_IOCTL, R_DUP, R_DUP2, R_DUP3, R_FCNTL, R_FCNTL64,
	R_COUNT
};

static const char *const real_names[R_COUNT] = {
	"open", "open64", "openat", "openat64",
	"__open_2", "__open64_2", "__openat_2", "__openat64_2",
	"close", "ioctl", "dup", "dup2", "dup3", "fcntl", "fcntl64",
};

/* What to use when the next library lacks a symbol (an old or odd libc). */
static const int real_fallback[R_COUNT] = {
	[R_OPEN] = -1, [R_OPEN64] = R_OPEN, [R_OPENAT] = -1, [R_OPENAT64] = R_OPENAT,
	[R_OPEN_2] = R_OPEN, [R_OPEN64_2] = R_OPEN64,
	[R_OPENAT_2] = R_OPENAT, [R_OPENAT64_2] = R_OPENAT64,
	[R_CLOSE] = -1, [R_IOCTL] = -1, [R_DUP] = -1, [R_DUP2] = -1, [R_DUP3] = -1,
	[R_FCNTL] = -1, [R_FCNTL64] = R_FCNTL,
};

static _Atomic(void *) real_slots[R_COUNT];

static int missing_symbol(void)
{
	errno = ENOSYS;
	return -1;
}

static void *real_fn(int which)
{
	void *p = atomic_load_explicit(&real_slots[which], memory_order_acquire);
	if (LIKELY(p != NULL))
		return p;
	p = dlsym(RTLD_NEXT, real_names[which]);
	if (!p && real_fallback[which] >= 0)
		p = real_fn(real_fallback[which]);
	if (!p)
		p = (void *)missing_symbol; /* every real function returns int */
	atomic_store_explicit(&real_slots[which], p, memory_order_release);
	return p;
}

#define REAL(type, which) ((type)real_fn(which))

/* ---------------------------------------------------------------------- */
/* Connections and the fd table. */

struct conn {
	atomic_int refs;     /* table entries + ioctls in flight */
	pid_t pid;           /* the process that connected it */
	unsigned gen;        /* fork generation at connect time */
	dev_t dev;           /* the socket's identity, to spot stale entries */
	ino_t ino;
	pthread_mutex_t lock; /* one request in flight per connection */
	/* Under lock: */
	int broken;          /* the stream is lost: every call fails with EIO */
	unsigned pending;    /* replies of abandoned (EINTR) requests to skip */
	unsigned char *scratch;
};

/* Two levels: 1024 chunks of 1024 slots cover fds below 2^20. A chunk is
 * allocated on first use and never freed, so the lock-free lookup of the
 * fast path is two loads and no lock. Mutations hold table_lock. */
#define FD_CHUNK_BITS 10
#define FD_CHUNK (1u << FD_CHUNK_BITS)
#define FD_CHUNKS 1024u
#define FD_LIMIT (FD_CHUNK * FD_CHUNKS)

typedef _Atomic(struct conn *) conn_slot;

static _Atomic(conn_slot *) fd_chunks[FD_CHUNKS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
/* Incremented in the child of every fork (pthread_atfork); a connection made
 * under another generation, or by another pid, belongs to an ancestor. */
static atomic_uint fork_gen;
static size_t page_size = 4096;
/* Cleared if process_vm_readv/writev turn out to be unavailable. */
static atomic_int vm_calls_work = 1;

static inline struct conn *fd_peek(int fd)
{
	if (UNLIKELY((unsigned)fd >= FD_LIMIT))
		return NULL;
	conn_slot *chunk = atomic_load_explicit(&fd_chunks[(unsigned)fd >> FD_CHUNK_BITS],
						memory_order_acquire);
	if (LIKELY(chunk == NULL))
		return NULL;
	return atomic_load_explicit(&chunk[(unsigned)fd & (FD_CHUNK - 1)], memory_order_acquire);
}

/* The slot of fd, allocating its chunk if asked; table_lock held. */
static conn_slot *fd_slot(int fd, int create)
{
	if ((unsigned)fd >= FD_LIMIT)
		return NULL;
	unsigned k = (unsigned)fd >> FD_CHUNK_BITS;
	conn_slot *chunk = atomic_load_explicit(&fd_chunks[k], memory_order_acquire);
	if (!chunk && create) {
		chunk = calloc(FD_CHUNK, sizeof(conn_slot));
		if (!chunk)
			return NULL;
		for (unsigned i = 0; i < FD_CHUNK; i++)
			atomic_init(&chunk[i], NULL);
		atomic_store_explicit(&fd_chunks[k], chunk, memory_order_release);
	}
	return chunk ? &chunk[(unsigned)fd & (FD_CHUNK - 1)] : NULL;
}

static int conn_is_ours(const struct conn *c)
{
	return c->pid == getpid() && c->gen == atomic_load(&fork_gen);
}

/* Frees a connection object; its mutex is destroyed only when it is this
 * process's own (an inherited copy may be locked by a thread that does not
 * exist here). */
static void conn_free(struct conn *c)
{
	if (conn_is_ours(c))
		pthread_mutex_destroy(&c->lock);
	free(c->scratch);
	free(c);
}

static void conn_put(struct conn *c)
{
	if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
		conn_free(c);
}

static struct conn *conn_new(int sock, pid_t pid, unsigned gen)
{
	struct stat st;
	if (fstat(sock, &st) != 0)
		return NULL;
	struct conn *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	atomic_init(&c->refs, 0);
	c->pid = pid;
	c->gen = gen;
	c->dev = st.st_dev;
	c->ino = st.st_ino;
	if (pthread_mutex_init(&c->lock, NULL) != 0) {
		free(c);
		return NULL;
	}
	return c;
}

/* Makes fd refer to c (or to nothing when c is NULL), dropping what it
 * referred to; table_lock held. -1 (ENOMEM/EMFILE) if fd cannot be tracked. */
static int table_set(int fd, struct conn *c)
{
	conn_slot *slot = fd_slot(fd, c != NULL);
	if (!slot) {
		if (!c)
			return 0;
		errno = (unsigned)fd >= FD_LIMIT ? EMFILE : ENOMEM;
		return -1;
	}
	if (c)
		atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
	struct conn *old = atomic_exchange_explicit(slot, c, memory_order_acq_rel);
	if (old)
		conn_put(old);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Paths and connecting. */

/* "/dev/blksnap", allowing repeated slashes and "." components. */
static int is_blksnap_path(const char *p)
{
	static const char *const want[2] = { "dev", "blksnap" };
	if (!p || p[0] != '/')
		return 0;
	int i = 0;
	for (;;) {
		while (*p == '/')
			p++;
		if (!*p)
			break;
		const char *s = p;
		while (*p && *p != '/')
			p++;
		size_t n = (size_t)(p - s);
		if (n == 1 && s[0] == '.')
			continue;
		if (i >= 2 || strlen(want[i]) != n || memcmp(s, want[i], n) != 0)
			return 0;
		i++;
	}
	return i == 2 && p[-1] != '/';
}

static int real_device_present(void)
{
	struct stat st;
	return stat(BLKSNAP_DEVICE_PATH, &st) == 0 && S_ISCHR(st.st_mode);
}

/* A new connection to the daemon, close-on-exec unless asked otherwise. A
 * daemon that is not there reads as a missing device: ENOENT. */
static int connect_daemon(int cloexec)
{
	const char *path = getenv(BLKSNAP_CONTROL_SOCKET_ENV);
	if (!path || !*path)
		path = BLKSNAP_CONTROL_SOCKET;
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	size_t n = strlen(path);
	if (n >= sizeof(sa.sun_path)) {
		errno = ENOENT;
		return -1;
	}
	memcpy(sa.sun_path, path, n);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	int r;
	while ((r = connect(s, (struct sockaddr *)&sa, sizeof(sa))) != 0 && errno == EINTR)
		;
	if (r != 0 && errno != EISCONN) {
		int e = errno;
		REAL(close_fn, R_CLOSE)(s);
		errno = (e == ENOENT || e == ECONNREFUSED || e == ENOTDIR) ? ENOENT : e;
		return -1;
	}
	if (!cloexec && REAL(fcntl_fn, R_FCNTL)(s, F_SETFD, 0) != 0) {
		int e = errno;
		REAL(close_fn, R_CLOSE)(s);
		errno = e;
		return -1;
	}
	return s;
}

/* open of the control device. *handled = 0: pass the call through. */
static int open_device(int flags, int *handled)
{
	*handled = 0;
	if (real_device_present())
		return -1;
	*handled = 1;
	int s = connect_daemon((flags & O_CLOEXEC) != 0);
	if (s < 0)
		return -1;
	struct conn *c = conn_new(s, getpid(), atomic_load(&fork_gen));
	if (!c) {
		REAL(close_fn, R_CLOSE)(s);
		errno = ENOMEM;
		return -1;
	}
	pthread_mutex_lock(&table_lock);
	int r = table_set(s, c);
	int e = errno;
	pthread_mutex_unlock(&table_lock);
	if (r != 0) {
		conn_free(c);
		REAL(close_fn, R_CLOSE)(s);
		errno = e;
		return -1;
	}
	return s;
}

/*
 * In a child of fork: give every fd that refers to the ancestor's
 * connection `old` a fresh connection of its own, dup3'ed over the same fd
 * numbers with their close-on-exec flags kept. table_lock held. The old
 * object is this process's private copy and nobody here uses it any more.
 */
static void reconnect(struct conn *old, pid_t pid, unsigned gen)
{
	int s = connect_daemon(1);
	if (s < 0)
		return;
	struct conn *n = conn_new(s, pid, gen);
	if (!n) {
		REAL(close_fn, R_CLOSE)(s);
		return;
	}
	for (unsigned k = 0; k < FD_CHUNKS; k++) {
		conn_slot *chunk = atomic_load_explicit(&fd_chunks[k], memory_order_acquire);
		if (!chunk)
			continue;
		for (unsigned i = 0; i < FD_CHUNK; i++) {
			if (atomic_load_explicit(&chunk[i], memory_order_relaxed) != old)
				continue;
			int fd = (int)(k * FD_CHUNK + i);
			struct stat st;
			struct conn *now = NULL;
			if (fstat(fd, &st) == 0 && st.st_dev == old->dev && st.st_ino == old->ino) {
				int fl = REAL(fcntl_fn, R_FCNTL)(fd, F_GETFD);
				if (fl >= 0 && REAL(dup3_fn, R_DUP3)(s, fd, (fl & FD_CLOEXEC) ? O_CLOEXEC : 0) == fd) {
					atomic_fetch_add_explicit(&n->refs, 1, memory_order_relaxed);
					now = n;
				}
			}
			atomic_store_explicit(&chunk[i], now, memory_order_release);
		}
	}
	REAL(close_fn, R_CLOSE)(s);
	free(old->scratch);
	free(old);
	if (atomic_load(&n->refs) == 0)
		conn_free(n);
}

/* ---------------------------------------------------------------------- */
/* Caller memory, through process_vm_readv/writev on our own pid. */

static int vm_unavailable(ssize_t n)
{
	if (n < 0 && (errno == ENOSYS || errno == EPERM)) {
		atomic_store(&vm_calls_work, 0);
		return 1;
	}
	return 0;
}

static int mem_read(pid_t pid, void *dst, uint64_t src, size_t len)
{
	if (len == 0)
		return 0;
	if (src == 0 || src + len < src)
		return -1;
	if (LIKELY(atomic_load_explicit(&vm_calls_work, memory_order_relaxed))) {
		struct iovec l = { dst, len }, r = { (void *)(uintptr_t)src, len };
		ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
		if (n == (ssize_t)len)
			return 0;
		if (!vm_unavailable(n))
			return -1;
	}
	memcpy(dst, (const void *)(uintptr_t)src, len);
	return 0;
}

static int mem_write(pid_t pid, uint64_t dst, const void *src, size_t len)
{
	if (len == 0)
		return 0;
	if (dst == 0 || dst + len < dst)
		return -1;
	if (LIKELY(atomic_load_explicit(&vm_calls_work, memory_order_relaxed))) {
		struct iovec l = { (void *)src, len }, r = { (void *)(uintptr_t)dst, len };
		ssize_t n = process_vm_writev(pid, &l, 1, &r, 1, 0);
		if (n == (ssize_t)len)
			return 0;
		if (!vm_unavailable(n))
			return -1;
	}
	memcpy((void *)(uintptr_t)dst, src, len);
	return 0;
}

/* Whether [addr, addr+len) is readable: one byte of every page it touches. */
static int mem_probe(pid_t pid, uint64_t addr, uint64_t len)
{
	if (addr == 0 || addr + len < addr)
		return -1;
	if (!atomic_load_explicit(&vm_calls_work, memory_order_relaxed))
		return 0;
	uint64_t end = addr + len, a = addr;
	struct iovec r[PROBE_BATCH];
	unsigned char sink[PROBE_BATCH];
	while (a < end) {
		int n = 0;
		while (n < PROBE_BATCH && a < end) {
			r[n].iov_base = (void *)(uintptr_t)a;
			r[n].iov_len = 1;
			n++;
			uint64_t next = (a & ~((uint64_t)page_size - 1)) + page_size;
			if (next <= a)
				break; /* the top of the address space */
			a = next;
		}
		struct iovec l = { sink, (size_t)n };
		ssize_t got = process_vm_readv(pid, &l, 1, r, (unsigned long)n, 0);
		if (got != n)
			return vm_unavailable(got) ? 0 : -1;
		if (n < PROBE_BATCH && a < end)
			return -1;
	}
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The stream. */

static int send_all(int fd, struct iovec *iov, int n)
{
	while (n > 0) {
		struct msghdr m;
		memset(&m, 0, sizeof(m));
		m.msg_iov = iov;
		m.msg_iovlen = (size_t)n;
		ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
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

/* Buffered reads of one connection's replies. Only one request is ever
 * outstanding, so whatever one recv returns belongs to the replies being
 * read, and the buffer is empty again when they are done. */
struct reader {
	int fd;
	unsigned char *buf;
	size_t cap, pos, end;
};

enum { RD_OK = 0, RD_BROKEN = -1, RD_EINTR = -2 };

static int rd_fill(struct reader *r, int allow_eintr)
{
	for (;;) {
		ssize_t n = recv(r->fd, r->buf, r->cap, 0);
		if (n > 0) {
			r->pos = 0;
			r->end = (size_t)n;
			return RD_OK;
		}
		if (n == 0)
			return RD_BROKEN;
		if (errno == EINTR) {
			if (allow_eintr)
				return RD_EINTR;
			continue;
		}
		return RD_BROKEN;
	}
}

static int rd_exact(struct reader *r, void *dst, size_t len, int allow_eintr)
{
	unsigned char *d = dst;
	while (len) {
		if (r->pos == r->end) {
			int e = rd_fill(r, allow_eintr);
			if (e != RD_OK)
				return e;
		}
		allow_eintr = 0;
		size_t n = r->end - r->pos;
		if (n > len)
			n = len;
		memcpy(d, r->buf + r->pos, n);
		r->pos += n;
		d += n;
		len -= n;
	}
	return RD_OK;
}

static int write_allowed(const struct blksnap_control_region *regs, int nregs,
			 uint64_t addr, uint32_t len)
{
	for (int i = 0; i < nregs; i++) {
		const struct blksnap_control_region *g = &regs[i];
		if (!(g->flow & BLKSNAP_ABI_OUT))
			continue;
		if (addr >= g->address && len <= g->length && addr - g->address <= g->length - len)
			return 1;
	}
	return 0;
}

struct reply_state {
	int32_t result;
	int copy_failed; /* a write into the caller failed */
	int stray;       /* the daemon wrote outside the regions shipped */
};

/* Reads one whole reply; applies its writes when regs is given (else
 * discards them). */
static int read_reply(struct reader *r, pid_t pid, const struct blksnap_control_region *regs,
		      int nregs, int apply, int allow_eintr, struct reply_state *st)
{
	struct blksnap_control_reply rep;
	int e = rd_exact(r, &rep, sizeof(rep), allow_eintr);
	if (e != RD_OK)
		return e;
	if (rep.magic != BLKSNAP_CONTROL_MAGIC || rep.write_count > MAX_WRITES ||
	    rep.payload_length > BLKSNAP_CONTROL_MAX_BYTES)
		return RD_BROKEN;
	for (uint32_t i = 0; i < rep.write_count; i++) {
		struct blksnap_control_write w;
		if (rd_exact(r, &w, sizeof(w), 0) != RD_OK || w.length > BLKSNAP_CONTROL_MAX_BYTES)
			return RD_BROKEN;
		int ok = apply && write_allowed(regs, nregs, w.address, w.length);
		if (apply && !ok)
			st->stray = 1;
		uint32_t off = 0;
		while (off < w.length) {
			if (r->pos == r->end && rd_fill(r, 0) != RD_OK)
				return RD_BROKEN;
			size_t n = r->end - r->pos;
			if (n > w.length - off)
				n = w.length - off;
			if (ok && !st->copy_failed &&
			    mem_write(pid, w.address + off, r->buf + r->pos, n) != 0)
				st->copy_failed = 1;
			r->pos += n;
			off += (uint32_t)n;
		}
	}
	uint32_t left = rep.payload_length;
	while (left) {
		if (r->pos == r->end && rd_fill(r, 0) != RD_OK)
			return RD_BROKEN;
		size_t n = r->end - r->pos;
		if (n > left)
			n = left;
		r->pos += n;
		left -= (uint32_t)n;
	}
	st->result = rep.result;
	return RD_OK;
}

/* The stream is lost (daemon gone, or out of step): EIO from now on. The
 * socket is shut down only if fd still is it (a racing close may have
 * handed the number to another file). */
static void mark_broken(struct conn *c, int fd)
{
	struct stat st;
	c->broken = 1;
	if (fstat(fd, &st) == 0 && st.st_dev == c->dev && st.st_ino == c->ino)
		shutdown(fd, SHUT_RDWR);
}

/* One ioctl as one request and one reply; c->lock serializes them. */
static int conn_call(struct conn *c, int fd, unsigned long request, void *arg, pid_t pid)
{
	int err = 0, ret = -1;
	void *heap = NULL;

	pthread_mutex_lock(&c->lock);
	if (c->broken) {
		err = EIO;
		goto out;
	}
	if (!c->scratch && !(c->scratch = malloc(SCRATCH_SIZE))) {
		err = ENOMEM;
		goto out;
	}
	struct reader rd = { fd, c->scratch, SCRATCH_SIZE, 0, 0 };
	while (c->pending) {
		struct reply_state skip = { 0, 0, 0 };
		if (read_reply(&rd, pid, NULL, 0, 0, 0, &skip) != RD_OK) {
			mark_broken(c, fd);
			err = EIO;
			goto out;
		}
		c->pending--;
	}
	rd.pos = rd.end = 0; /* the scratch now holds the request */

	/* The kernel takes the command as an unsigned int, and so do we. */
	uint32_t cmd = (uint32_t)request;
	const struct blksnap_abi_command *row = blksnap_abi_find(cmd);
	struct blksnap_control_request rq;
	memset(&rq, 0, sizeof(rq));
	rq.magic = BLKSNAP_CONTROL_MAGIC;
	rq.type = BLKSNAP_CONTROL_IOCTL;
	rq.command = cmd;
	rq.argument = (uint64_t)(uintptr_t)arg;

	struct blksnap_control_region regs[2];
	struct iovec iov[5];
	int niov = 0, nregs = 0;
	iov[niov++] = (struct iovec){ &rq, sizeof(rq) };

	if (row && arg && row->arg_size <= SCRATCH_SIZE) {
		unsigned char *sbuf = c->scratch;
		uint64_t a = (uint64_t)(uintptr_t)arg;
		if (mem_read(pid, sbuf, a, row->arg_size) == 0) {
			regs[nregs] = (struct blksnap_control_region){ a, row->arg_size, row->arg_flow };
			iov[niov++] = (struct iovec){ &regs[nregs], sizeof(regs[0]) };
			if (row->arg_flow & BLKSNAP_ABI_IN)
				iov[niov++] = (struct iovec){ sbuf, row->arg_size };
			nregs++;
			if (row->ptr_offset >= 0) {
				uint64_t p;
				uint32_t count;
				memcpy(&p, sbuf + row->ptr_offset, sizeof(p));
				memcpy(&count, sbuf + row->count_offset, sizeof(count));
				uint64_t len = (uint64_t)count * row->elem_size;
				if (p && len) {
					if (len + row->arg_size > BLKSNAP_CONTROL_MAX_BYTES) {
						err = ENOMEM;
						goto out;
					}
					regs[nregs] = (struct blksnap_control_region){ p, (uint32_t)len, row->ptr_flow };
					if (row->ptr_flow & BLKSNAP_ABI_IN) {
						unsigned char *abuf;
						if (row->arg_size + len <= SCRATCH_SIZE) {
							abuf = sbuf + row->arg_size;
						} else if (!(abuf = heap = malloc(len))) {
							err = ENOMEM;
							goto out;
						}
						if (mem_read(pid, abuf, p, len) == 0) {
							iov[niov++] = (struct iovec){ &regs[nregs], sizeof(regs[0]) };
							iov[niov++] = (struct iovec){ abuf, len };
							nregs++;
						}
					} else if (mem_probe(pid, p, len) == 0) {
						iov[niov++] = (struct iovec){ &regs[nregs], sizeof(regs[0]) };
						nregs++;
					}
				}
			}
		}
	}
	rq.region_count = (uint32_t)nregs;

	if (send_all(fd, iov, niov) != 0) {
		mark_broken(c, fd);
		err = EIO;
		goto out;
	}
	free(heap);
	heap = NULL;

	rd.pos = rd.end = 0;
	struct reply_state st = { 0, 0, 0 };
	/* Only WAIT_EVENT sleeps interruptibly in the module: a signal (without
	 * SA_RESTART) before its reply comes ends it with EINTR, and the late
	 * reply is skipped before the next request. */
	int e = read_reply(&rd, pid, regs, nregs, 1, cmd == IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, &st);
	if (e == RD_EINTR) {
		c->pending++;
		err = EINTR;
		goto out;
	}
	if (e != RD_OK) {
		mark_broken(c, fd);
		err = EIO;
		goto out;
	}
	if (st.result < 0)
		err = st.result == INT32_MIN ? EIO : -st.result;
	else if (st.stray)
		err = EIO;
	else if (st.copy_failed)
		err = ENODATA;
	else
		ret = st.result;
out:
	pthread_mutex_unlock(&c->lock);
	free(heap);
	if (err) {
		errno = err;
		return -1;
	}
	return ret;
}

static int ioctl_slow(int fd, unsigned long request, void *arg)
{
	pid_t pid = getpid();
	unsigned gen = atomic_load(&fork_gen);
	struct stat st;

	pthread_mutex_lock(&table_lock);
	struct conn *c = fd_peek(fd);
	/* An entry whose fd no longer is our socket (closed behind our back,
	 * by close_range or a raw syscall, and reused) is forgotten. */
	if (c && (fstat(fd, &st) != 0 || st.st_dev != c->dev || st.st_ino != c->ino)) {
		table_set(fd, NULL);
		c = NULL;
	}
	if (c && (c->pid != pid || c->gen != gen)) {
		reconnect(c, pid, gen);
		c = fd_peek(fd);
		if (c && (c->pid != pid || c->gen != gen)) {
			pthread_mutex_unlock(&table_lock);
			errno = EIO;
			return -1;
		}
	}
	if (c)
		atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
	pthread_mutex_unlock(&table_lock);

	if (!c)
		return REAL(ioctl_fn, R_IOCTL)(fd, request, arg);
	int r = conn_call(c, fd, request, arg, pid);
	int e = errno;
	conn_put(c);
	errno = e;
	return r;
}

/* ---------------------------------------------------------------------- */
/* The interposed functions. */

#define OPEN_NEEDS_MODE(flags) (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE)

#define TAKE_MODE(flags, last)                                  \
	mode_t mode = 0;                                        \
	if (OPEN_NEEDS_MODE(flags)) {                           \
		va_list ap;                                     \
		va_start(ap, last);                             \
		mode = (mode_t)va_arg(ap, int);                 \
		va_end(ap);                                     \
	}

#define TRY_DEVICE(path, flags)                                 \
	if (UNLIKELY(is_blksnap_path(path))) {                  \
		int handled_;                                   \
		int r_ = open_device(flags, &handled_);         \
		if (handled_)                                   \
			return r_;                              \
	}

EXPORT int open(const char *path, int flags, ...)
{
	TAKE_MODE(flags, flags);
	TRY_DEVICE(path, flags);
	return REAL(open_fn, R_OPEN)(path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
	TAKE_MODE(flags, flags);
	TRY_DEVICE(path, flags);
	return REAL(open_fn, R_OPEN64)(path, flags, mode);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
	TAKE_MODE(flags, flags);
	TRY_DEVICE(path, flags); /* absolute paths only: dirfd does not matter */
	return REAL(openat_fn, R_OPENAT)(dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
	TAKE_MODE(flags, flags);
	TRY_DEVICE(path, flags);
	return REAL(openat_fn, R_OPENAT64)(dirfd, path, flags, mode);
}

/* The _FORTIFY_SOURCE entry points (no mode). */
EXPORT int __open_2(const char *path, int flags)
{
	TRY_DEVICE(path, flags);
	return REAL(open2_fn, R_OPEN_2)(path, flags);
}

EXPORT int __open64_2(const char *path, int flags)
{
	TRY_DEVICE(path, flags);
	return REAL(open2_fn, R_OPEN64_2)(path, flags);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
	TRY_DEVICE(path, flags);
	return REAL(openat2_fn, R_OPENAT_2)(dirfd, path, flags);
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
	TRY_DEVICE(path, flags);
	return REAL(openat2_fn, R_OPENAT64_2)(dirfd, path, flags);
}

EXPORT int close(int fd)
{
	if (LIKELY(fd_peek(fd) == NULL))
		return REAL(close_fn, R_CLOSE)(fd);
	pthread_mutex_lock(&table_lock);
	table_set(fd, NULL);
	int r = REAL(close_fn, R_CLOSE)(fd);
	int e = errno;
	pthread_mutex_unlock(&table_lock);
	errno = e;
	return r;
}

EXPORT int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	va_start(ap, request);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (LIKELY(fd_peek(fd) == NULL))
		return REAL(ioctl_fn, R_IOCTL)(fd, request, arg);
	return ioctl_slow(fd, request, arg);
}

/* After a successful duplication to newfd (table_lock held): newfd now
 * refers to what oldfd referred to. */
static int adopt(int newfd, struct conn *c)
{
	if (newfd < 0)
		return newfd;
	if (table_set(newfd, c) != 0) {
		int e = errno;
		REAL(close_fn, R_CLOSE)(newfd);
		errno = e;
		return -1;
	}
	return newfd;
}

EXPORT int dup(int oldfd)
{
	if (LIKELY(fd_peek(oldfd) == NULL))
		return REAL(dup_fn, R_DUP)(oldfd);
	pthread_mutex_lock(&table_lock);
	struct conn *c = fd_peek(oldfd);
	int r = adopt(REAL(dup_fn, R_DUP)(oldfd), c);
	int e = errno;
	pthread_mutex_unlock(&table_lock);
	errno = e;
	return r;
}

EXPORT int dup2(int oldfd, int newfd)
{
	if (LIKELY(fd_peek(oldfd) == NULL && fd_peek(newfd) == NULL))
		return REAL(dup2_fn, R_DUP2)(oldfd, newfd);
	pthread_mutex_lock(&table_lock);
	struct conn *c = fd_peek(oldfd);
	int r = REAL(dup2_fn, R_DUP2)(oldfd, newfd);
	if (r >= 0 && oldfd != newfd)
		r = adopt(r, c);
	int e = errno;
	pthread_mutex_unlock(&table_lock);
	errno = e;
	return r;
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
	if (LIKELY(fd_peek(oldfd) == NULL && fd_peek(newfd) == NULL))
		return REAL(dup3_fn, R_DUP3)(oldfd, newfd, flags);
	pthread_mutex_lock(&table_lock);
	struct conn *c = fd_peek(oldfd);
	int r = adopt(REAL(dup3_fn, R_DUP3)(oldfd, newfd, flags), c);
	int e = errno;
	pthread_mutex_unlock(&table_lock);
	errno = e;
	return r;
}

static int fcntl_common(int which, int fd, int cmd, void *arg)
{
	if (LIKELY((cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC) || fd_peek(fd) == NULL))
		return REAL(fcntl_fn, which)(fd, cmd, arg);
	pthread_mutex_lock(&table_lock);
	struct conn *c = fd_peek(fd);
	int r = adopt(REAL(fcntl_fn, which)(fd, cmd, arg), c);
	int e = errno;
	pthread_mutex_unlock(&table_lock);
	errno = e;
	return r;
}

/* fcntl's third argument is an int, a long or a pointer; as a void * it is
 * passed on unchanged on LP64. */
EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(R_FCNTL, fd, cmd, arg);
}

/* What callers built with _FILE_OFFSET_BITS=64 call. */
EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(R_FCNTL64, fd, cmd, arg);
}

/* ---------------------------------------------------------------------- */

static void atfork_prepare(void)
{
	pthread_mutex_lock(&table_lock);
}

static void atfork_parent(void)
{
	pthread_mutex_unlock(&table_lock);
}

static void atfork_child(void)
{
	atomic_fetch_add(&fork_gen, 1);
	pthread_mutex_unlock(&table_lock);
}

__attribute__((constructor)) static void preload_init(void)
{
	for (int i = 0; i < R_COUNT; i++)
		real_fn(i);
	long ps = sysconf(_SC_PAGESIZE);
	if (ps > 0)
		page_size = (size_t)ps;
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
