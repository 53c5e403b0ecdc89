/*
 * test-preload.c: checks the LD_PRELOAD shim against preload/fake-server.c.
 * Run as: LD_PRELOAD=.../libblksnap-preload.so test-preload FAKE_SERVER_BIN
 * (tests/test-preload.sh does). Prints "ok - WHAT" or "not ok - WHAT" per
 * check, as the shell scenarios do (forked processes print their own),
 * comments as "# ...", and exits non-zero when a check failed.
 *
 * Nothing here waits for time to pass: where a check needs the other side
 * to have got somewhere, it waits for that (the fake server's ready byte,
 * a thread seen blocked in the shim's wait for its reply, an event the
 * fake server holds a WAIT_EVENT for).
 */
#define _GNU_SOURCE
#undef _FORTIFY_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "CBlksnapABI.h"

/* The fortify entry points, called directly to check they are interposed. */
extern int __open_2(const char *, int);
extern int __open64_2(const char *, int);
extern int __openat_2(int, const char *, int);
extern int __openat64_2(int, const char *, int);

#define DEV "/dev/blksnap"
#define CMD_DROP 0xdead0001u
#define CMD_EVENT 0xdead0002u /* the fake server raises an event */
#define FAKE_EVENT_CODE blk_snap_event_code_corrupted
/* A WAIT_EVENT held until a test raises an event: its timeout only ends a
 * test whose event never comes. */
#define HELD_MS 120000u

static atomic_int passed, failed;
static char tmpdir[64], sock_path[128], server_bin[4096];
static pid_t server_pid;

#define CHECK(cond, ...)                                                     \
	do {                                                                 \
		int ok_ = !!(cond);                                          \
		int e_ = errno;                                              \
		atomic_fetch_add(ok_ ? &passed : &failed, 1);                \
		flockfile(stdout);                                           \
		fputs(ok_ ? "ok - " : "not ok - ", stdout);                  \
		printf(__VA_ARGS__);                                         \
		if (!ok_)                                                    \
			printf("\n#   %s:%d, errno %d: %s", __FILE__, __LINE__, \
			       e_, strerror(e_));                            \
		putchar('\n');                                               \
		funlockfile(stdout);                                         \
		fflush(stdout);                                              \
		errno = e_;                                                  \
	} while (0)

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Waits until thread `tid` of this process is blocked in recvfrom: the
 * shim has sent its request and waits for the reply, the moment a test of
 * what happens meanwhile needs. 0; -1 when it is not seen within a minute
 * (or /proc does not show it), and the check that needs it fails. */
static int wait_blocked_in_reply(pid_t tid)
{
	char path[64], buf[64];
	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", (int)tid);
	double deadline = now_ms() + 60000;
	for (unsigned looks = 0;; looks++) {
		int f = open(path, O_RDONLY | O_CLOEXEC);
		ssize_t n = f >= 0 ? read(f, buf, sizeof(buf) - 1) : -1;
		if (f >= 0)
			close(f);
		if (n <= 0)
			return -1;
		buf[n] = 0;
		/* "running", or the number of the syscall it sleeps in. */
		if (buf[0] >= '0' && buf[0] <= '9' && strtol(buf, NULL, 10) == SYS_recvfrom)
			return 0;
		if (now_ms() >= deadline)
			return -1;
		/* Between two looks, not instead of one: a state that does
		 * not come (a broken shim) must not hold a core for a minute. */
		if (looks < 1000)
			sched_yield();
		else
			poll(NULL, 0, 1);
	}
}

static int raise_event(int fd)
{
	return ioctl(fd, CMD_EVENT, NULL);
}

static uint64_t fnv1a64(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static int is_socket(int fd)
{
	struct stat st;
	return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

static ino_t ino_of(int fd)
{
	struct stat st;
	return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

/* 0: VERSION answered 1.0.0.0; -1: the ioctl failed (errno); -2: wrong data. */
static int version(int fd)
{
	struct blk_snap_version v = { 9, 9, 9, 9 };
	int r = ioctl(fd, IOCTL_BLK_SNAP_VERSION, &v);
	if (r != 0)
		return r < 0 ? -1 : -2;
	if (v.major != 1 || v.minor || v.revision || v.build) {
		errno = EBADMSG;
		return -2;
	}
	return 0;
}

/* SNAPSHOT_CREATE through the fake server's echo: the id must be the hash of
 * exactly the ids shipped, and the count. */
static int create_echo(int fd, const struct blk_snap_dev_t *ids, uint32_t count)
{
	struct blk_snap_snapshot_create c;
	memset(&c, 0x5a, sizeof(c));
	c.count = count;
	c.dev_id_array = (struct blk_snap_dev_t *)ids;
	int r = ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_CREATE, &c);
	if (r != 0)
		return r < 0 ? -1 : -2;
	uint64_t want[2] = { fnv1a64(ids, (size_t)count * sizeof(*ids)), count }, got[2];
	memcpy(got, c.id, sizeof(got));
	if (memcmp(want, got, sizeof(want)) != 0 || c.count != count || c.dev_id_array != ids) {
		errno = EBADMSG;
		return -2;
	}
	return 0;
}

/* A VERSION and a CREATE with ids unique to (a, b, i). */
static int mixed_op(int fd, uint32_t a, uint32_t b, uint32_t i)
{
	if (version(fd) != 0)
		return -1;
	struct blk_snap_dev_t ids[3] = { { a, b }, { i, a ^ i }, { b + i, 7 } };
	return create_echo(fd, ids, 1 + i % 3);
}

/* ---------------------------------------------------------------------- */

/* Starts the fake server and waits for its byte on a pipe, written once it
 * listens: 0, or -1 when it died first. */
static int start_server(void)
{
	int ready[2];
	if (pipe2(ready, O_CLOEXEC) != 0)
		return -1;
	fflush(stdout);
	pid_t p = fork();
	if (p == 0) {
		char fd[16];
		snprintf(fd, sizeof(fd), "%d", ready[1]);
		fcntl(ready[1], F_SETFD, 0);
		unsetenv("LD_PRELOAD");
		execl(server_bin, server_bin, sock_path, fd, (char *)NULL);
		perror("exec fake-server");
		_exit(127);
	}
	close(ready[1]);
	if (p < 0) {
		close(ready[0]);
		return -1;
	}
	server_pid = p;
	char c;
	ssize_t n;
	while ((n = read(ready[0], &c, 1)) < 0 && errno == EINTR)
		;
	close(ready[0]);
	return n == 1 ? 0 : -1;
}

static void stop_server(void)
{
	if (server_pid > 0) {
		kill(server_pid, SIGKILL);
		waitpid(server_pid, NULL, 0);
		server_pid = 0;
	}
}

/* ---------------------------------------------------------------------- */

static void test_open(void)
{
	printf("# == open, VERSION, command numbers\n");
	int fd = open(DEV, O_RDWR);
	CHECK(fd >= 0, "open(%s)", DEV);
	CHECK(is_socket(fd), "the device fd is the control socket");
	CHECK(fcntl(fd, F_GETFD) == 0, "no O_CLOEXEC: FD_CLOEXEC clear");
	CHECK(version(fd) == 0, "VERSION");

	int fx = open(DEV, O_RDWR | O_CLOEXEC);
	CHECK(fx >= 0 && (fcntl(fx, F_GETFD) & FD_CLOEXEC), "O_CLOEXEC: FD_CLOEXEC set");
	CHECK(version(fx) == 0, "VERSION on the O_CLOEXEC fd");
	close(fx);

	int dirfd = open(tmpdir, O_RDONLY | O_DIRECTORY);
	struct {
		const char *name;
		int fd;
	} opens[] = {
		{ "openat(AT_FDCWD)", openat(AT_FDCWD, DEV, O_RDWR) },
		{ "openat(dirfd, absolute)", openat(dirfd, DEV, O_RDWR) },
		{ "open(\"//dev//./blksnap\")", open("//dev//./blksnap", O_RDWR) },
		{ "open64", open64(DEV, O_RDWR) },
		{ "openat64", openat64(AT_FDCWD, DEV, O_RDWR) },
		{ "__open_2", __open_2(DEV, O_RDWR) },
		{ "__open64_2", __open64_2(DEV, O_RDWR) },
		{ "__openat_2", __openat_2(AT_FDCWD, DEV, O_RDWR) },
		{ "__openat64_2", __openat64_2(dirfd, DEV, O_RDWR) },
	};
	for (size_t i = 0; i < sizeof(opens) / sizeof(opens[0]); i++) {
		CHECK(opens[i].fd >= 0 && is_socket(opens[i].fd), "%s gives the control socket", opens[i].name);
		CHECK(version(opens[i].fd) == 0, "VERSION after %s", opens[i].name);
		close(opens[i].fd);
	}
	close(dirfd);

	int x = 0;
	errno = 0;
	CHECK(ioctl(fd, _IOW('V', 12, int), &x) == -1 && errno == ENOTTY, "command 12: ENOTTY");
	errno = 0;
	CHECK(ioctl(fd, 0x12345678ul, NULL) == -1 && errno == ENOTTY, "unknown number: ENOTTY");
	struct blk_snap_version v = { 0, 0, 0, 0 };
	CHECK(ioctl(fd, (1ul << 32) | IOCTL_BLK_SNAP_VERSION, &v) == 0 && v.major == 1,
	      "the request is a 32-bit number, as the kernel takes it");
	CHECK(version(fd) == 0, "VERSION after the unknown commands");

	CHECK(close(fd) == 0, "close");
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_VERSION, &v) == -1 && errno == EBADF, "ioctl after close: EBADF");
}

static void test_memory(void)
{
	printf("# == arrays, and bad caller memory\n");
	int fd = open(DEV, O_RDWR);
	CHECK(fd >= 0, "open");

	struct blk_snap_dev_t ids[3] = { { 8, 0 }, { 8, 16 }, { 253, 3 } };
	CHECK(create_echo(fd, ids, 3) == 0, "SNAPSHOT_CREATE ships the IN array exactly");
	CHECK(create_echo(fd, NULL, 0) == 0, "SNAPSHOT_CREATE with count 0");
	uint32_t big = 20000; /* 160 KB: more than the shim's scratch */
	struct blk_snap_dev_t *many = malloc(big * sizeof(*many));
	for (uint32_t i = 0; i < big; i++)
		many[i] = (struct blk_snap_dev_t){ i * 2654435761u, ~i };
	CHECK(create_echo(fd, many, big) == 0, "SNAPSHOT_CREATE with a %u-entry array", big);
	free(many);

	unsigned char small[100];
	memset(small, 0, sizeof(small));
	struct blk_snap_tracker_read_cbt_bitmap m = { { 8, 7 }, 5, sizeof(small), small };
	int r = ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &m);
	int good = 1;
	for (uint32_t k = 0; k < sizeof(small); k++)
		good &= small[k] == (unsigned char)((5 + k) ^ 7);
	CHECK(r == (int)sizeof(small) && good, "READ_CBT_MAP of 100 bytes: returned %d", r);

	size_t mib = 1u << 20;
	unsigned char *map = malloc(mib);
	memset(map, 0, mib);
	m = (struct blk_snap_tracker_read_cbt_bitmap){ { 8, 3 }, 1000, (uint32_t)mib, map };
	r = ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &m);
	good = 1;
	for (size_t k = 0; k < mib; k++)
		good &= map[k] == (unsigned char)((1000 + k) ^ 3);
	CHECK(r == (int)mib && good, "READ_CBT_MAP of 1 MiB: returned %d", r);
	free(map);
	m.length = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &m) == 0, "READ_CBT_MAP of 0 bytes");

	struct blk_snap_tracker_collect tc = { 77, NULL };
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc) == 0 && tc.count == 3,
	      "TRACKER_COLLECT with a NULL array: count %u", tc.count);
	struct blk_snap_cbt_info info[4];
	memset(info, 0xee, sizeof(info));
	tc = (struct blk_snap_tracker_collect){ 2, info };
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc) == -1 && errno == ENOBUFS && tc.count == 2,
	      "TRACKER_COLLECT with a small array: ENOBUFS");
	tc = (struct blk_snap_tracker_collect){ 4, info };
	r = ioctl(fd, IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc);
	good = r == 0 && tc.count == 3 && tc.cbt_info_array == info;
	for (uint32_t i = 0; i < 3; i++)
		good &= info[i].dev_id.mj == i + 1 && info[i].dev_id.mn == i + 10 &&
			info[i].device_capacity == (uint64_t)(i + 1) << 30 && info[i].snap_number == i + 1 &&
			info[i].generation_id[15] == 0xa0 + i;
	good &= info[3].dev_id.mj == 0xeeeeeeeeu;
	CHECK(good, "TRACKER_COLLECT fills the OUT array and the count, nothing more");

	struct blk_snap_block_range ranges[5] = { { 0, 8 }, { 16, 8 }, { 64, 1 }, { 1000, 24 }, { 4096, 4096 } };
	struct blk_snap_tracker_mark_dirty_blocks md = { { 8, 0 }, 5, ranges };
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_MARK_DIRTY_BLOCKS, &md) == 5, "MARK_DIRTY_BLOCKS ships 5 ranges");

	/* Bad memory: errors, never a crash. */
	long ps = sysconf(_SC_PAGESIZE);
	unsigned char *pages = mmap(NULL, 3 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *ro = pages, *rw = pages + ps, *none = pages + 2 * ps;
	struct blk_snap_version *vro = (void *)ro;
	mprotect(ro, ps, PROT_READ);
	mprotect(none, ps, PROT_NONE);

	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_VERSION, (void *)1) == -1 && errno == ENODATA, "VERSION at (void *)1: ENODATA");
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_VERSION, NULL) == -1 && errno == ENODATA, "VERSION at NULL: ENODATA");
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_VERSION, none) == -1 && errno == ENODATA, "VERSION at PROT_NONE: ENODATA");
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_VERSION, vro) == -1 && errno == ENODATA && vro->major == 0,
	      "VERSION into read-only memory: ENODATA (the copy back fails)");
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_VERSION, none - 4) == -1 && errno == ENODATA,
	      "VERSION straddling into PROT_NONE: ENODATA");
	struct blk_snap_snapshot_create sc = { 2, (void *)1, { 0 } };
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_CREATE, &sc) == -1 && errno == ENODATA,
	      "SNAPSHOT_CREATE with an unreadable IN array: ENODATA");
	m = (struct blk_snap_tracker_read_cbt_bitmap){ { 8, 3 }, 0, 64, (void *)1 };
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &m) == -1 && errno == ENODATA,
	      "READ_CBT_MAP into (void *)1: ENODATA");
	m.buff = ro;
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &m) == -1 && errno == ENODATA && ro[0] == 0,
	      "READ_CBT_MAP into read-only memory: ENODATA");
	m.buff = rw + ps - 16; /* 16 bytes writable, then PROT_NONE */
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &m) == -1 && errno == ENODATA,
	      "READ_CBT_MAP into an array that runs into PROT_NONE: ENODATA");
	m.buff = rw;
	m.length = 512u << 20;
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &m) == -1 && errno == ENOMEM,
	      "an array over BLKSNAP_CONTROL_MAX_BYTES: ENOMEM");
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, (void *)1) == -1 && errno == EINVAL,
	      "WAIT_EVENT at (void *)1: EINVAL");
	CHECK(version(fd) == 0, "the stream is intact after the errors");
	munmap(pages, 3 * ps);
	close(fd);
}

static void test_dup(void)
{
	printf("# == dup, dup2, dup3, fcntl\n");
	int fd = open(DEV, O_RDWR);
	int a = dup(fd);
	CHECK(a >= 0 && a != fd, "dup");
	CHECK(close(fd) == 0, "close the original");
	CHECK(version(a) == 0, "VERSION on the dup after closing the original");

	CHECK(dup2(a, 200) == 200, "dup2 to 200");
	CHECK(version(200) == 0, "VERSION on the dup2");
	int c = fcntl(a, F_DUPFD, 300);
	CHECK(c >= 300 && fcntl(c, F_GETFD) == 0, "F_DUPFD: %d, no FD_CLOEXEC", c);
	CHECK(version(c) == 0, "VERSION on the F_DUPFD");
	int d = fcntl(a, F_DUPFD_CLOEXEC, 400);
	CHECK(d >= 400 && (fcntl(d, F_GETFD) & FD_CLOEXEC), "F_DUPFD_CLOEXEC: %d, FD_CLOEXEC", d);
	CHECK(version(d) == 0, "VERSION on the F_DUPFD_CLOEXEC");
	int d64 = fcntl64(a, F_DUPFD, 700);
	CHECK(d64 >= 700 && version(d64) == 0, "fcntl64(F_DUPFD), as _FILE_OFFSET_BITS=64 callers call it");
	close(d64);
	CHECK(dup3(a, 500, O_CLOEXEC) == 500 && (fcntl(500, F_GETFD) & FD_CLOEXEC), "dup3 O_CLOEXEC");
	CHECK(version(500) == 0, "VERSION on the dup3");
	CHECK(dup2(c, c) == c && version(c) == 0, "dup2 onto itself");
	CHECK(fcntl(c, F_GETFL) >= 0, "fcntl(F_GETFL) passes through");

	CHECK(close(a) == 0, "close one dup");
	CHECK(version(200) == 0 && version(c) == 0 && version(d) == 0 && version(500) == 0,
	      "the other dups keep working");

	char path[128];
	snprintf(path, sizeof(path), "%s/plain", tmpdir);
	int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(f >= 0 && write(f, "hello", 5) == 5, "a plain file");
	CHECK(dup2(f, 200) == 200, "dup2 a plain file over a device fd");
	struct blk_snap_version v;
	errno = 0;
	CHECK(ioctl(200, IOCTL_BLK_SNAP_VERSION, &v) == -1 && errno == ENOTTY,
	      "the replaced fd is no longer ours: the kernel's ENOTTY");
	char buf[8] = { 0 };
	CHECK(pread(200, buf, 5, 0) == 5 && memcmp(buf, "hello", 5) == 0, "and reads the file");
	CHECK(version(c) == 0, "the connection lives on in the other dups");
	CHECK(dup2(c, 200) == 200 && version(200) == 0, "dup2 a device fd over a plain file");
	int fplain = fcntl(f, F_DUPFD, 600);
	errno = 0;
	CHECK(fplain >= 600 && ioctl(fplain, IOCTL_BLK_SNAP_VERSION, &v) == -1 && errno == ENOTTY,
	      "F_DUPFD of a plain file is not ours");
	close(fplain);
	close(f);
	close(200);
	close(c);
	close(d);
	close(500);
	errno = 0;
	CHECK(ioctl(c, IOCTL_BLK_SNAP_VERSION, &v) == -1 && errno == EBADF, "closed: EBADF");
}

static void test_untouched(void)
{
	printf("# == other files are untouched\n");
	char path[128];
	snprintf(path, sizeof(path), "%s/other", tmpdir);
	int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(f >= 0 && write(f, "0123456789", 10) == 10 && lseek(f, 4, SEEK_SET) == 4, "a plain file");
	int avail = -1;
	CHECK(ioctl(f, FIONREAD, &avail) == 0 && avail == 6, "FIONREAD on it: %d", avail);
	struct blk_snap_version v;
	errno = 0;
	CHECK(ioctl(f, IOCTL_BLK_SNAP_VERSION, &v) == -1 && errno == ENOTTY, "VERSION on it: ENOTTY");
	CHECK(fcntl(f, F_SETFL, O_APPEND) == 0 && (fcntl(f, F_GETFL) & O_APPEND), "fcntl F_SETFL/F_GETFL");
	int g = dup(f);
	CHECK(g >= 0 && close(f) == 0 && close(g) == 0, "dup and close");

	errno = 0;
	CHECK(open("/dev/blksnapX", O_RDWR) == -1 && errno == ENOENT, "/dev/blksnapX is not ours");
	errno = 0;
	CHECK(open("/dev/blksnap/", O_RDWR) == -1, "/dev/blksnap/ is not ours");
	int devfd = open("/dev", O_RDONLY | O_DIRECTORY);
	int rel = openat(devfd, "blksnap", O_RDWR);
	CHECK(rel < 0 || !is_socket(rel), "openat(\"/dev\" fd, \"blksnap\") is not intercepted");
	if (rel >= 0)
		close(rel);
	close(devfd);
	int n = open("/dev/null", O_RDWR);
	struct termios t;
	errno = 0;
	CHECK(n >= 0 && ioctl(n, TCGETS, &t) == -1 && errno == ENOTTY, "/dev/null: TCGETS is ENOTTY");
	close(n);
}

static void test_stale(void)
{
	printf("# == an fd closed behind the shim's back\n");
	int fd = open(DEV, O_RDWR);
	CHECK(fd >= 0, "open");
	syscall(SYS_close, fd);
	char path[128];
	snprintf(path, sizeof(path), "%s/stale", tmpdir);
	int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (f != fd) {
		printf("# note: the fd number was not reused (%d vs %d); check skipped\n", f, fd);
	} else {
		struct blk_snap_version v;
		errno = 0;
		CHECK(ioctl(f, IOCTL_BLK_SNAP_VERSION, &v) == -1 && errno == ENOTTY,
		      "the reused fd number reaches the kernel: ENOTTY");
	}
	close(f);
}

/* ---------------------------------------------------------------------- */

struct worker {
	int fd;       /* shared fd, or -1: open one's own */
	uint32_t id;
	int errors;
	int n;
};

static void *worker_main(void *p)
{
	struct worker *w = p;
	int fd = w->fd >= 0 ? w->fd : open(DEV, O_RDWR);
	if (fd < 0) {
		w->errors = w->n;
		return NULL;
	}
	for (int i = 0; i < w->n; i++)
		if (mixed_op(fd, w->id, 0x1000 + w->id, (uint32_t)i) != 0)
			w->errors++;
	if (w->fd < 0)
		close(fd);
	return NULL;
}

static atomic_int churn_stop;

static void *churn_main(void *p)
{
	int *errors = p;
	while (!atomic_load(&churn_stop)) {
		int fd = open(DEV, O_RDWR);
		int d = fd >= 0 ? dup(fd) : -1;
		int e = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
		if (fd < 0 || d < 0 || e < 0 || version(d) != 0 || close(fd) != 0 || version(e) != 0)
			(*errors)++;
		close(d);
		close(e);
	}
	return NULL;
}

static void test_threads(void)
{
	printf("# == threads\n");
	int fd = open(DEV, O_RDWR);
	struct worker w[8];
	pthread_t t[8], churn;
	int churn_errors = 0;
	atomic_store(&churn_stop, 0);
	pthread_create(&churn, NULL, churn_main, &churn_errors);
	for (int i = 0; i < 8; i++) {
		w[i] = (struct worker){ i < 4 ? fd : -1, (uint32_t)i + 1, 0, 1000 };
		pthread_create(&t[i], NULL, worker_main, &w[i]);
	}
	int shared = 0, own = 0;
	for (int i = 0; i < 8; i++) {
		pthread_join(t[i], NULL);
		if (i < 4)
			shared += w[i].errors;
		else
			own += w[i].errors;
	}
	atomic_store(&churn_stop, 1);
	pthread_join(churn, NULL);
	CHECK(shared == 0, "4 threads x 1000 VERSION+CREATE on one shared fd: %d errors", shared);
	CHECK(own == 0, "4 threads x 1000 VERSION+CREATE on their own fds: %d errors", own);
	CHECK(churn_errors == 0, "open/dup/close churn alongside: %d errors", churn_errors);
	CHECK(version(fd) == 0, "the shared fd after");
	close(fd);
}

/* ---------------------------------------------------------------------- */

/* A thread in a WAIT_EVENT held until an event is raised. */
struct waiter {
	int fd;
	sem_t started; /* tid is set */
	pid_t tid;
	int result, err;
	uint32_t code;
};

static void *wait_event_main(void *p)
{
	struct waiter *w = p;
	struct blk_snap_snapshot_event e;
	memset(&e, 0, sizeof(e));
	e.timeout_ms = HELD_MS;
	w->tid = gettid();
	sem_post(&w->started);
	errno = 0;
	w->result = ioctl(w->fd, IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, &e);
	w->err = errno;
	w->code = e.code;
	return NULL;
}

/* Raises the event that ends a held WAIT_EVENT once `done` is readable,
 * setting *raised first. A minute without: a child is stuck (a call
 * queued behind that WAIT_EVENT, or a lock the fork copied held), and is
 * killed, so the test fails instead of hanging. */
struct raiser {
	int done, fd, ok, gave_up;
	atomic_int *raised;
	atomic_int kids[2];
};

static void *raise_main(void *p)
{
	struct raiser *r = p;
	struct pollfd pf = { r->done, POLLIN, 0 };
	if (poll(&pf, 1, 60000) == 0) {
		r->gave_up = 1;
		for (int k = 0; k < 2; k++)
			if (atomic_load(&r->kids[k]) > 0)
				kill(atomic_load(&r->kids[k]), SIGKILL);
	}
	atomic_store(r->raised, 1);
	r->ok = raise_event(r->fd) == 0;
	return NULL;
}

/* The work of a forked process; returns its failure count. */
static int forked_work(int fa, int fb, int fc, int fw, ino_t parent_ino, int level, atomic_int *raised)
{
	int before = atomic_load(&failed);
	CHECK(version(fw) == 0, "[pid %d] VERSION on an fd whose parent request is in flight", getpid());
	CHECK(!atomic_load(raised), "[pid %d] ... answered while the parent's request is still held", getpid());
	CHECK(version(fa) == 0, "[pid %d] VERSION on the inherited fd", getpid());
	CHECK(ino_of(fa) != parent_ino, "[pid %d] a connection of its own", getpid());
	CHECK(ino_of(fa) == ino_of(fc), "[pid %d] dups of one connection stay one connection", getpid());
	CHECK(fcntl(fa, F_GETFD) == 0 && (fcntl(fb, F_GETFD) & FD_CLOEXEC) && fcntl(fc, F_GETFD) == 0,
	      "[pid %d] FD_CLOEXEC kept by the reconnection", getpid());
	pid_t grandchild = -1;
	if (level == 1) {
		fflush(stdout);
		grandchild = fork();
		if (grandchild == 0) {
			int errors = 0;
			for (uint32_t i = 0; i < 300; i++)
				errors += mixed_op(i % 2 ? fa : fc, (uint32_t)getpid(), 3, i) != 0;
			CHECK(errors == 0, "[grandchild %d] 300 calls: %d errors", getpid(), errors);
			fflush(stdout);
			_exit(atomic_load(&failed) - before > 0);
		}
	}
	int errors = 0;
	int fds[3] = { fa, fb, fc };
	for (uint32_t i = 0; i < 1000; i++)
		errors += mixed_op(fds[i % 3], (uint32_t)getpid(), 2, i) != 0;
	CHECK(errors == 0, "[pid %d] 1000 VERSION+CREATE concurrently with the parent: %d errors", getpid(), errors);
	if (grandchild > 0) {
		int st = 0;
		CHECK(waitpid(grandchild, &st, 0) == grandchild && WIFEXITED(st) && WEXITSTATUS(st) == 0,
		      "grandchild status %#x", st);
	}
	return atomic_load(&failed) - before;
}

static void test_fork(void)
{
	printf("# == fork\n");
	int fa = open(DEV, O_RDWR), fb = open(DEV, O_RDWR | O_CLOEXEC), fc = dup(fa);
	int fw = open(DEV, O_RDWR);
	CHECK(version(fa) == 0 && version(fb) == 0 && version(fc) == 0 && version(fw) == 0, "before fork");
	ino_t ino = ino_of(fa);

	/* A thread holds fw's connection in a WAIT_EVENT while we fork; the
	 * event that ends it is raised once the children are done, so a child
	 * whose call on fw queued behind it sees *raised set. */
	atomic_int *raised = mmap(NULL, sizeof(*raised), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	atomic_init(raised, 0);
	struct waiter w = { .fd = fw };
	sem_init(&w.started, 0, 0);
	pthread_t t;
	pthread_create(&t, NULL, wait_event_main, &w);
	while (sem_wait(&w.started) != 0 && errno == EINTR)
		;
	CHECK(wait_blocked_in_reply(w.tid) == 0, "a thread waits in WAIT_EVENT on fw while we fork");
	int done[2];
	CHECK(pipe2(done, O_CLOEXEC) == 0, "pipe");
	struct raiser rs = { .done = done[0], .fd = open(DEV, O_RDWR | O_CLOEXEC), .raised = raised };
	pthread_t rt;
	pthread_create(&rt, NULL, raise_main, &rs);

	pid_t kids[2];
	for (int k = 0; k < 2; k++) {
		fflush(stdout);
		kids[k] = fork();
		if (kids[k] == 0) {
			int f = forked_work(fa, fb, fc, fw, ino, k + 1, raised);
			fflush(stdout);
			_exit(f > 0);
		}
		atomic_store(&rs.kids[k], kids[k]);
	}
	int errors = 0;
	int fds[3] = { fa, fb, fc };
	for (uint32_t i = 0; i < 1000; i++)
		errors += mixed_op(fds[i % 3], (uint32_t)getpid(), 1, i) != 0;
	CHECK(errors == 0, "parent: 1000 VERSION+CREATE concurrently with the children: %d errors", errors);
	CHECK(ino_of(fa) == ino, "the parent keeps its connection");
	for (int k = 0; k < 2; k++) {
		int st = 0;
		CHECK(waitpid(kids[k], &st, 0) == kids[k] && WIFEXITED(st) && WEXITSTATUS(st) == 0,
		      "child %d status %#x", k, st);
	}
	CHECK(write(done[1], "d", 1) == 1, "the children are done");
	pthread_join(rt, NULL);
	CHECK(rs.ok && !rs.gave_up, "an event raised, the children done (none killed after a minute stuck)");
	pthread_join(t, NULL);
	CHECK(w.result == 0 && w.code == FAKE_EVENT_CODE, "the parent's WAIT_EVENT, held through the forks, gets it (%d, %s, code %u)",
	      w.result, strerror(w.err), w.code);
	CHECK(version(fw) == 0, "and its stream is intact");
	close(done[0]);
	close(done[1]);
	close(rs.fd);
	sem_destroy(&w.started);
	munmap(raised, sizeof(*raised));
	close(fa);
	close(fb);
	close(fc);
	close(fw);
}

/* The handler says it ran on a pipe (write is async-signal-safe). */
static int handled[2];

static void on_signal(int sig)
{
	(void)sig;
	int e = errno;
	if (write(handled[1], "s", 1) != 1)
		abort();
	errno = e;
}

/* Signals `thread` (tid `target`) once it waits in the shim for its
 * reply; with SA_RESTART it then waits for the handler to have run and
 * the call to wait again, and raises the event that ends it on `fd`. */
struct kicker {
	pthread_t thread;
	pid_t target;
	int restart, fd;
	int blocked, reblocked, raised;
};

static void *kick_main(void *p)
{
	struct kicker *k = p;
	k->blocked = wait_blocked_in_reply(k->target) == 0;
	pthread_kill(k->thread, SIGUSR1);
	char c;
	while (read(handled[0], &c, 1) < 0 && errno == EINTR)
		;
	if (k->restart) {
		k->reblocked = wait_blocked_in_reply(k->target) == 0;
		k->raised = raise_event(k->fd) == 0;
	}
	return NULL;
}

static int wait_with_signal(int fd, int restart, int raise_fd, struct blk_snap_snapshot_event *e, struct kicker *k)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sa.sa_flags = restart ? SA_RESTART : 0;
	sigaction(SIGUSR1, &sa, NULL);
	*k = (struct kicker){ pthread_self(), gettid(), restart, raise_fd, 0, 0, 0 };
	pthread_t t;
	pthread_create(&t, NULL, kick_main, k);
	e->timeout_ms = HELD_MS;
	errno = 0;
	int r = ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, e);
	int err = errno;
	pthread_join(t, NULL);
	signal(SIGUSR1, SIG_DFL);
	errno = err;
	return r;
}

/* Raises an event once `target` waits in the shim for a reply. */
struct late {
	pid_t target;
	int fd, blocked, raised;
};

static void *late_main(void *p)
{
	struct late *l = p;
	l->blocked = wait_blocked_in_reply(l->target) == 0;
	l->raised = raise_event(l->fd) == 0;
	return NULL;
}

static void test_signals(void)
{
	printf("# == WAIT_EVENT and signals\n");
	int fd = open(DEV, O_RDWR), g = open(DEV, O_RDWR);
	CHECK(pipe2(handled, O_CLOEXEC) == 0, "pipe");
	struct blk_snap_snapshot_event e;
	memset(&e, 0, sizeof(e));
	e.timeout_ms = 1;
	errno = 0;
	CHECK(ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, &e) == -1 && errno == ENOENT,
	      "WAIT_EVENT with no event runs out its timeout: ENOENT");

	struct kicker k;
	memset(&e, 0x5a, sizeof(e));
	int r = wait_with_signal(fd, 0, g, &e, &k);
	int err = errno;
	CHECK(k.blocked, "the signal comes while WAIT_EVENT waits for its reply");
	CHECK(r == -1 && err == EINTR, "a signal without SA_RESTART ends it with EINTR (%d, %s)", r, strerror(err));
	/* Its reply comes only with an event, raised while the next call waits. */
	struct late l = { gettid(), g, 0, 0 };
	pthread_t t;
	pthread_create(&t, NULL, late_main, &l);
	CHECK(version(fd) == 0, "the next call skips the late reply");
	pthread_join(t, NULL);
	CHECK(l.blocked && l.raised, "... which came while it waited");
	CHECK(e.code == 0x5a5a5a5au, "and the abandoned call's memory is left alone (code %#x)", e.code);

	memset(&e, 0, sizeof(e));
	r = wait_with_signal(fd, 1, g, &e, &k);
	err = errno;
	CHECK(k.blocked && k.reblocked, "with SA_RESTART the wait goes on after the handler");
	CHECK(k.raised && r == 0 && e.code == FAKE_EVENT_CODE, "and ends with the event raised then (%d, %s, code %u)",
	      r, strerror(err), e.code);
	CHECK(version(fd) == 0, "VERSION after");
	close(handled[0]);
	close(handled[1]);
	close(g);
	close(fd);
}

static void test_drop(void)
{
	printf("# == the daemon drops a connection\n");
	int fd = open(DEV, O_RDWR), g = open(DEV, O_RDWR);
	errno = 0;
	CHECK(ioctl(fd, CMD_DROP, NULL) == -1 && errno == EIO, "a broken connection: EIO");
	errno = 0;
	CHECK(version(fd) == -1 && errno == EIO, "and EIO from then on");
	CHECK(version(g) == 0, "other connections are unaffected");
	CHECK(close(fd) == 0 && close(g) == 0, "close");
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void test_latency(void)
{
	printf("# == latency\n");
	enum { N = 100000 };
	int fd = open(DEV, O_RDWR);
	uint64_t *ns = malloc(N * sizeof(*ns));
	int errors = 0;
	for (int i = 0; i < 1000; i++)
		errors += version(fd) != 0;
	for (int i = 0; i < N; i++) {
		struct timespec a, b;
		clock_gettime(CLOCK_MONOTONIC, &a);
		errors += version(fd) != 0;
		clock_gettime(CLOCK_MONOTONIC, &b);
		ns[i] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)(b.tv_nsec - a.tv_nsec);
	}
	qsort(ns, N, sizeof(*ns), cmp_u64);
	printf("# preload: VERSION round trip through the fake server: median %.1f us, p90 %.1f us, p99 %.1f us (%d calls)\n",
	       ns[N / 2] / 1e3, ns[N * 9 / 10] / 1e3, ns[N * 99 / 100] / 1e3, N);
	CHECK(errors == 0, "%d timed VERSION calls: %d errors", N, errors);
	free(ns);

	/* Calls on other fds: the shim's cost is one table lookup. */
	int n = open("/dev/null", O_RDONLY);
	double t0 = now_ms();
	for (int i = 0; i < N; i++)
		(void)fcntl(n, F_GETFD);
	printf("# preload: fcntl(F_GETFD) on a non-device fd: %.0f ns per call\n", (now_ms() - t0) * 1e6 / N);
	close(n);
	close(fd);
}

static void test_absent(void)
{
	printf("# == no daemon\n");
	char path[160];
	snprintf(path, sizeof(path), "%s/nothing.sock", tmpdir);
	setenv(BLKSNAP_CONTROL_SOCKET_ENV, path, 1);
	errno = 0;
	CHECK(open(DEV, O_RDWR) == -1 && errno == ENOENT, "no socket: ENOENT");

	snprintf(path, sizeof(path), "%s/dead.sock", tmpdir);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	strcpy(sa.sun_path, path);
	CHECK(bind(s, (struct sockaddr *)&sa, sizeof(sa)) == 0, "bind a socket nobody listens on");
	setenv(BLKSNAP_CONTROL_SOCKET_ENV, path, 1);
	errno = 0;
	CHECK(open(DEV, O_RDWR) == -1 && errno == ENOENT, "connection refused: ENOENT");
	close(s);
	setenv(BLKSNAP_CONTROL_SOCKET_ENV, sock_path, 1);

	int fd = open(DEV, O_RDWR);
	CHECK(version(fd) == 0, "with the daemon back");
	stop_server();
	errno = 0;
	CHECK(version(fd) == -1 && errno == EIO, "the daemon died: EIO");
	errno = 0;
	CHECK(open(DEV, O_RDWR) == -1 && errno == ENOENT, "and open gives ENOENT");
	CHECK(close(fd) == 0, "close");
}

/* In a private mount namespace with a character device at /dev/blksnap,
 * every call must pass through to the kernel. */
static void test_char_device(void)
{
	printf("# == a real /dev/blksnap character device\n");
	fflush(stdout);
	pid_t p = fork();
	if (p == 0) {
		if (unshare(CLONE_NEWNS) != 0 || mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
		    mount("tmpfs", "/dev", "tmpfs", 0, "mode=0755") != 0 ||
		    mknod(DEV, S_IFCHR | 0600, makedev(1, 3)) != 0) {
			printf("# skipped: no private mount namespace here (%s)\n", strerror(errno));
			fflush(stdout);
			_exit(77);
		}
		int before = atomic_load(&failed);
		int fd = open(DEV, O_RDWR);
		struct stat st;
		CHECK(fd >= 0 && fstat(fd, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3),
		      "open passes through to the device");
		struct blk_snap_version v;
		errno = 0;
		CHECK(ioctl(fd, IOCTL_BLK_SNAP_VERSION, &v) == -1 && errno == ENOTTY, "ioctl passes through");
		int d = dup(fd);
		CHECK(d >= 0 && write(d, "x", 1) == 1 && close(d) == 0 && close(fd) == 0, "dup, write, close");
		int a = openat(AT_FDCWD, DEV, O_RDWR | O_CLOEXEC);
		CHECK(a >= 0 && !is_socket(a), "openat passes through");
		close(a);
		fflush(stdout);
		_exit(atomic_load(&failed) - before > 0 ? 1 : 0);
	}
	int st = 0;
	waitpid(p, &st, 0);
	if (WIFEXITED(st) && WEXITSTATUS(st) == 77)
		return;
	/* The child's checks counted in its copy of the counters. */
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "character device pass-through (status %#x)", st);
}

/* With a real /dev/blksnap (module or CUSE device) the shim steps aside, so
 * the tests run where it is hidden: a private mount namespace. */
static int hide_real_device(void)
{
	struct stat st;
	if (stat(DEV, &st) != 0 || !S_ISCHR(st.st_mode))
		return 0;
	printf("# note: %s is a character device here; testing in a private mount namespace\n", DEV);
	if (unshare(CLONE_NEWNS) != 0 || mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
	    mount("tmpfs", "/dev", "tmpfs", 0, "mode=0755") != 0 ||
	    mknod("/dev/null", S_IFCHR | 0666, makedev(1, 3)) != 0)
		return -1;
	return 0;
}

static void remove_tmpdir(void)
{
	DIR *d = opendir(tmpdir);
	if (d) {
		struct dirent *e;
		while ((e = readdir(d)) != NULL)
			if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
				unlinkat(dirfd(d), e->d_name, 0);
		closedir(d);
	}
	if (rmdir(tmpdir) != 0)
		printf("# note: could not remove %s\n", tmpdir);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2 || strlen(argv[1]) >= sizeof(server_bin)) {
		fprintf(stderr, "usage: LD_PRELOAD=libblksnap-preload.so test-preload FAKE_SERVER\n");
		return 2;
	}
	strcpy(server_bin, argv[1]);
	strcpy(tmpdir, "/tmp/blksnap-preload-XXXXXX");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 2;
	}
	snprintf(sock_path, sizeof(sock_path), "%s/control.sock", tmpdir);
	setenv(BLKSNAP_CONTROL_SOCKET_ENV, sock_path, 1);
	signal(SIGPIPE, SIG_IGN);

	if (hide_real_device() != 0) {
		CHECK(0, "hide the real %s in a private mount namespace", DEV);
	} else if (start_server() != 0) {
		CHECK(0, "the fake server comes up at %s", sock_path);
	} else {
		test_open();
		test_memory();
		test_dup();
		test_untouched();
		test_stale();
		test_threads();
		test_fork();
		test_signals();
		test_drop();
		test_latency();
		test_char_device();
		test_absent(); /* stops the server */
	}
	stop_server();
	remove_tmpdir();
	return atomic_load(&failed) > 0;
}
