/*
 * blksnap-conformance: the ioctl-level conformance suite of the blksnap v1
 * control interface (shared/ABI-v1.md).
 *
 * It drives every command through /dev/blksnap exactly as a tool would
 * (open O_RDWR, ioctl with the real structs of <blksnap/blk_snap.h>) and
 * names the expected result of every check, so it can be pointed at any
 * implementation: blksnapd through the preload shim or its CUSE device, or
 * the kernel module.
 *
 *   blksnap-conformance [options] DEV1 DEV2 STORAGE_DEV
 *
 * DEV1, DEV2: two block devices the implementation can snapshot (for
 * blksnap-swift: engine-routed devices). Their content is overwritten in
 * a few places. STORAGE_DEV: a third block device whose sectors are used
 * freely as difference storage (and which must not be tracked).
 *
 * Options:
 *   --unrouted DEV             a block device that is not routed: CREATE with
 *                              it must fail with ENODEV (blksnap-swift only)
 *   --diff-storage-minimum N   the implementation's diff_storage_minimum, in
 *                              sectors (default 2097152)
 *   --skip-defect-checks       skip the checks that the 2022 module is known
 *                              to fail (ABI-v1.md, "Known defects"), some of
 *                              which crash or hang it: command number 12,
 *                              type byte 'X', CREATE with count 0, ...
 *
 * Every check prints "ok - DESCRIPTION" or
 * "not ok - DESCRIPTION (got X, expected Y)"; the last line is
 * "conformance: N passed, M failed". Exit status: 0 all passed, 1 some
 * failed (a /dev/blksnap that cannot be opened among them), 77 the suite
 * could not start (the devices given cannot be used), 2 bad usage.
 *
 * Plain C11 against -Iinclude; no libuuid function is called.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <blksnap/blk_snap.h>

#define SECTOR 512ull
#define KiB 1024ull
#define MiB (1024ull * 1024ull)
#define IO_SIZE (64 * KiB)
#define EVENT_TIMEOUT_MS 100u

/* ---------------------------------------------------------------------- */
/* Results. */

static unsigned passed, failed, skipped;
static bool skip_defects;

static const char *errno_name(int e)
{
	switch (e) {
#define N(x) case x: return #x;
	N(EPERM) N(ENOENT) N(ESRCH) N(EINTR) N(EIO) N(ENXIO) N(E2BIG) N(EBADF)
	N(EAGAIN) N(ENOMEM) N(EACCES) N(EFAULT) N(EBUSY) N(EEXIST) N(ENODEV)
	N(ENOTDIR) N(EINVAL) N(ENOSPC) N(ENOTTY) N(ENOSYS) N(ENODATA)
	N(ENOBUFS) N(EALREADY) N(EOPNOTSUPP) N(EPROTO) N(ERANGE) N(ECONNREFUSED)
	N(ETIMEDOUT) N(ENOTCONN) N(EPIPE) N(EOVERFLOW) N(EROFS)
#undef N
	default: return NULL;
	}
}

/* Describes an ioctl result: "success (N)" or the errno's name. */
static const char *describe(long ret, char *buf, size_t len)
{
	if (ret >= 0) {
		snprintf(buf, len, "success (returned %ld)", ret);
	} else {
		const char *n = errno_name((int)-ret);
		if (n)
			snprintf(buf, len, "%s", n);
		else
			snprintf(buf, len, "errno %ld", -ret);
	}
	return buf;
}

static void vreport(bool ok, const char *desc, const char *got, const char *want)
{
	if (ok) {
		passed++;
		printf("ok - %s\n", desc);
	} else {
		failed++;
		printf("not ok - %s (got %s, expected %s)\n", desc, got, want);
	}
	fflush(stdout);
}

/* A check with free-form got/expected texts. */
static bool check(bool ok, const char *desc, const char *want, const char *gotfmt, ...)
{
	char got[512] = "";
	if (!ok) {
		va_list ap;
		va_start(ap, gotfmt);
		vsnprintf(got, sizeof(got), gotfmt, ap);
		va_end(ap);
	}
	vreport(ok, desc, got, want);
	return ok;
}

/* ioctl result (>= 0, or -errno) is a success. */
static bool expect_ok(const char *desc, long ret)
{
	char g[64];
	vreport(ret >= 0, desc, describe(ret, g, sizeof(g)), "success");
	return ret >= 0;
}

/* ioctl result equals want exactly (a success value). */
static bool expect_ret(const char *desc, long ret, long want)
{
	char g[64], w[64];
	vreport(ret == want, desc, describe(ret, g, sizeof(g)), describe(want, w, sizeof(w)));
	return ret == want;
}

/* ioctl failed with errno e. */
static bool expect_errno(const char *desc, long ret, int e)
{
	char g[64], w[64];
	vreport(ret == -e, desc, describe(ret, g, sizeof(g)), describe(-e, w, sizeof(w)));
	return ret == -e;
}

static bool expect_u64(const char *desc, uint64_t got, uint64_t want)
{
	char w[32];
	snprintf(w, sizeof(w), "%" PRIu64, want);
	return check(got == want, desc, w, "%" PRIu64, got);
}

static void skip(const char *desc, const char *why)
{
	skipped++;
	printf("# skip - %s (%s)\n", desc, why);
	fflush(stdout);
}

/* Checks the 2022 module is documented to fail (or to crash on) run only
 * without --skip-defect-checks. */
static bool defect_check(const char *desc, const char *module_does)
{
	if (!skip_defects)
		return true;
	char why[256];
	snprintf(why, sizeof(why), "2022 module defect: %s", module_does);
	skip(desc, why);
	return false;
}

static void note(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("# ", stdout);
	vprintf(fmt, ap);
	fputc('\n', stdout);
	va_end(ap);
	fflush(stdout);
}

/* ---------------------------------------------------------------------- */
/* The control device. */

static int ctl = -1;

static long xio(unsigned long cmd, void *arg)
{
	errno = 0;
	int r = ioctl(ctl, cmd, arg);
	if (r < 0)
		return errno ? -(long)errno : -(long)EIO;
	return r;
}

static uint64_t now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------------- */
/* Devices under test. */

struct dev {
	const char *path;
	struct blk_snap_dev_t id;
	uint64_t size; /* bytes */
	int fd;        /* O_RDWR, O_DIRECT when the device takes it */
};

static struct dev dev1, dev2, storage;
static uint64_t diff_storage_minimum = 2097152;
static const char *unrouted_path;

static const struct blk_snap_dev_t no_such_dev = { 259, 99999 };

static bool same_dev(struct blk_snap_dev_t a, struct blk_snap_dev_t b)
{
	return a.mj == b.mj && a.mn == b.mn;
}

static bool dev_id_of(const char *path, struct blk_snap_dev_t *id, char *why, size_t len)
{
	struct stat st;
	if (stat(path, &st) != 0) {
		snprintf(why, len, "cannot stat %s: %s", path, strerror(errno));
		return false;
	}
	if (!S_ISBLK(st.st_mode)) {
		snprintf(why, len, "%s is not a block device", path);
		return false;
	}
	id->mj = major(st.st_rdev);
	id->mn = minor(st.st_rdev);
	return true;
}

static bool open_dev(struct dev *d, const char *path, char *why, size_t len)
{
	d->path = path;
	if (!dev_id_of(path, &d->id, why, len))
		return false;
	d->fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
	if (d->fd < 0 && errno == EINVAL)
		d->fd = open(path, O_RDWR | O_CLOEXEC);
	if (d->fd < 0) {
		snprintf(why, len, "cannot open %s: %s", path, strerror(errno));
		return false;
	}
	if (ioctl(d->fd, BLKGETSIZE64, &d->size) != 0) {
		snprintf(why, len, "cannot size %s: %s", path, strerror(errno));
		return false;
	}
	return true;
}

static void *io_buf;  /* IO_SIZE, page aligned */
static void *cmp_buf; /* IO_SIZE, page aligned */

static void fill_pattern(void *buf, uint32_t seed)
{
	uint32_t *w = buf;
	uint32_t x = seed * 2654435761u + 1;
	for (size_t i = 0; i < IO_SIZE / 4; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		w[i] = x;
	}
}

/* Writes pattern `seed` at `off` and makes it durable (it has then passed
 * the implementation's write path). */
static bool write_pattern(int fd, uint64_t off, uint32_t seed)
{
	fill_pattern(io_buf, seed);
	if (pwrite(fd, io_buf, IO_SIZE, (off_t)off) != (ssize_t)IO_SIZE)
		return false;
	return fsync(fd) == 0;
}

/* Reads IO_SIZE at `off` and compares with pattern `seed`: 1 equal, 0
 * different, -errno on a read error. */
static int compare_pattern(int fd, uint64_t off, uint32_t seed)
{
	ssize_t n = pread(fd, cmp_buf, IO_SIZE, (off_t)off);
	if (n < 0)
		return -errno;
	if (n != (ssize_t)IO_SIZE)
		return -EIO;
	fill_pattern(io_buf, seed);
	return memcmp(io_buf, cmp_buf, IO_SIZE) == 0;
}

static const char *compare_text(int r)
{
	static char buf[64];
	if (r == 1)
		return "the pattern";
	if (r == 0)
		return "different data";
	snprintf(buf, sizeof(buf), "read error %s", errno_name(-r) ? errno_name(-r) : "?");
	return buf;
}

/* ---------------------------------------------------------------------- */
/* Command helpers (each returns the ioctl result, >= 0 or -errno). */

static long create_snapshot(struct blk_snap_dev_t *devs, uint32_t count, uuid_t id)
{
	struct blk_snap_snapshot_create arg;
	memset(&arg, 0, sizeof(arg));
	arg.count = count;
	arg.dev_id_array = devs;
	long r = xio(IOCTL_BLK_SNAP_SNAPSHOT_CREATE, &arg);
	if (r >= 0 && id)
		memcpy(id, arg.id, sizeof(uuid_t));
	return r;
}

static long destroy_snapshot(const uuid_t id)
{
	struct blk_snap_snapshot_destroy arg;
	memcpy(arg.id, id, sizeof(uuid_t));
	return xio(IOCTL_BLK_SNAP_SNAPSHOT_DESTROY, &arg);
}

static long take_snapshot(const uuid_t id)
{
	struct blk_snap_snapshot_take arg;
	memcpy(arg.id, id, sizeof(uuid_t));
	return xio(IOCTL_BLK_SNAP_SNAPSHOT_TAKE, &arg);
}

static long append_storage(const uuid_t id, struct blk_snap_dev_t dev,
			   struct blk_snap_block_range *ranges, uint32_t count)
{
	struct blk_snap_snapshot_append_storage arg;
	memset(&arg, 0, sizeof(arg));
	memcpy(arg.id, id, sizeof(uuid_t));
	arg.dev_id = dev;
	arg.count = count;
	arg.ranges = ranges;
	return xio(IOCTL_BLK_SNAP_SNAPSHOT_APPEND_STORAGE, &arg);
}

static long wait_event(const uuid_t id, uint32_t timeout_ms, struct blk_snap_snapshot_event *ev)
{
	memset(ev, 0, sizeof(*ev));
	memcpy(ev->id, id, sizeof(uuid_t));
	ev->timeout_ms = timeout_ms;
	return xio(IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, ev);
}

static long collect_images(const uuid_t id, struct blk_snap_image_info *arr, uint32_t count,
			   uint32_t *count_out)
{
	struct blk_snap_snapshot_collect_images arg;
	memset(&arg, 0, sizeof(arg));
	memcpy(arg.id, id, sizeof(uuid_t));
	arg.count = count;
	arg.image_info_array = arr;
	long r = xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT_IMAGES, &arg);
	if (count_out)
		*count_out = arg.count;
	return r;
}

static long read_cbt(struct blk_snap_dev_t dev, uint32_t offset, uint32_t length, uint8_t *buff)
{
	struct blk_snap_tracker_read_cbt_bitmap arg;
	memset(&arg, 0, sizeof(arg));
	arg.dev_id = dev;
	arg.offset = offset;
	arg.length = length;
	arg.buff = buff;
	return xio(IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &arg);
}

static long mark_dirty(struct blk_snap_dev_t dev, struct blk_snap_block_range *ranges, uint32_t count)
{
	struct blk_snap_tracker_mark_dirty_blocks arg;
	memset(&arg, 0, sizeof(arg));
	arg.dev_id = dev;
	arg.count = count;
	arg.dirty_blocks_array = ranges;
	return xio(IOCTL_BLK_SNAP_TRACKER_MARK_DIRTY_BLOCKS, &arg);
}

static long tracker_remove(struct blk_snap_dev_t dev)
{
	struct blk_snap_tracker_remove arg = { dev };
	return xio(IOCTL_BLK_SNAP_TRACKER_REMOVE, &arg);
}

static long sector_state(struct blk_snap_dev_t image, uint64_t sector, struct blk_snap_sector_state *out)
{
	struct blk_snap_get_sector_state arg;
	memset(&arg, 0, sizeof(arg));
	arg.image_dev_id = image;
	arg.sector = sector;
	long r = xio(IOCTL_BLK_SNAP_GET_SECTOR_STATE, &arg);
	if (out)
		*out = arg.state;
	return r;
}

/* TRACKER_COLLECT into a fresh array: returns the count, or -errno. */
static long collect_trackers(struct blk_snap_cbt_info **out)
{
	struct blk_snap_tracker_collect arg = { 0, NULL };
	long r = xio(IOCTL_BLK_SNAP_TRACKER_COLLECT, &arg);
	if (r < 0)
		return r;
	uint32_t n = arg.count;
	struct blk_snap_cbt_info *arr = calloc(n + 1, sizeof(*arr));
	arg.cbt_info_array = arr;
	r = xio(IOCTL_BLK_SNAP_TRACKER_COLLECT, &arg);
	if (r < 0) {
		free(arr);
		return r;
	}
	*out = arr;
	return arg.count;
}

static const struct blk_snap_cbt_info *find_tracker(const struct blk_snap_cbt_info *arr, long n,
						    struct blk_snap_dev_t dev)
{
	for (long i = 0; i < n; i++)
		if (same_dev(arr[i].dev_id, dev))
			return &arr[i];
	return NULL;
}

/* SNAPSHOT_COLLECT into a fresh array: returns the count, or -errno. */
static long collect_snapshots(uuid_t **out)
{
	struct blk_snap_snapshot_collect arg = { 0, NULL };
	long r = xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &arg);
	if (r < 0)
		return r;
	uint32_t n = arg.count;
	uuid_t *ids = calloc(n + 1, sizeof(uuid_t));
	arg.ids = ids;
	r = xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &arg);
	if (r < 0) {
		free(ids);
		return r;
	}
	*out = ids;
	return arg.count;
}

static bool id_listed(const uuid_t id)
{
	uuid_t *ids = NULL;
	long n = collect_snapshots(&ids);
	bool found = false;
	for (long i = 0; i < n; i++)
		if (memcmp(ids[i], id, sizeof(uuid_t)) == 0)
			found = true;
	free(ids);
	return found;
}

static bool uuid_is_zero(const uuid_t id)
{
	for (size_t i = 0; i < sizeof(uuid_t); i++)
		if (id[i])
			return false;
	return true;
}

static const char *uuid_text(const uuid_t id)
{
	static char buf[2][40];
	static int which;
	char *s = buf[which ^= 1];
	for (size_t i = 0; i < sizeof(uuid_t); i++)
		sprintf(s + 2 * i, "%02x", id[i]);
	return s;
}

/* The tracking block size of ABI-v1.md for the module's default settings:
 * 2^16 bytes, doubled until the count is at most 2^21 or 2^26 is reached. */
static uint64_t expected_block_size(uint64_t capacity)
{
	uint64_t bs = 1ull << 16;
	while ((capacity + bs - 1) / bs > (1ull << 21) && bs < (1ull << 26))
		bs <<= 1;
	return bs;
}

/* ---------------------------------------------------------------------- */
/* The checks. */

static char d[256]; /* description scratch */
#define DESC(...) (snprintf(d, sizeof(d), __VA_ARGS__), d)

static void test_version_mod_setlog(void)
{
	struct blk_snap_version v;
	memset(&v, 0xff, sizeof(v));
	if (expect_ok("VERSION succeeds", xio(IOCTL_BLK_SNAP_VERSION, &v)))
		check(v.major == 1 && v.minor == 0 && v.revision == 0 && v.build == 0,
		      "VERSION is 1.0.0.0", "1.0.0.0", "%u.%u.%u.%u", v.major, v.minor, v.revision, v.build);

	struct blk_snap_mod m;
	memset(&m, 0xff, sizeof(m));
	if (expect_ok("MOD succeeds", xio(IOCTL_BLK_SNAP_MOD, &m))) {
		size_t len = strnlen((const char *)m.name, sizeof(m.name));
		check(len < sizeof(m.name), "MOD name is a NUL-terminated string within 32 bytes",
		      "a NUL within name[32]", "no NUL in name[32]");
		if (len < sizeof(m.name))
			note("MOD: name \"%s\", compatibility_flags 0x%" PRIx64, (const char *)m.name,
			     (uint64_t)m.compatibility_flags);
	}

	struct blk_snap_setlog sl;
	memset(&sl, 0, sizeof(sl));
	sl.level = 6;
	sl.filepath = NULL;
	sl.filepath_size = 0;
	expect_ok("SETLOG with a NULL filepath succeeds (logging to a file off)",
		  xio(IOCTL_BLK_SNAP_SETLOG, &sl));
	sl.filepath = (__u8 *)(uintptr_t)8;
	sl.filepath_size = 16;
	expect_errno("SETLOG with an unreadable filepath (0x8) gives ENODATA",
		     xio(IOCTL_BLK_SNAP_SETLOG, &sl), ENODATA);
}

static void test_unknown_commands(void)
{
	struct blk_snap_version v;
	struct blk_snap_snapshot_event ev;
	memset(&ev, 0, sizeof(ev));
	if (defect_check("unknown command _IOW('V', 12, struct blk_snap_version) gives ENOTTY",
			 "number 12 passes the bounds check and crashes the kernel"))
		expect_errno("unknown command _IOW('V', 12, struct blk_snap_version) gives ENOTTY",
			     xio(_IOW(BLK_SNAP, 12, struct blk_snap_version), &v), ENOTTY);
	if (defect_check("unknown command _IOW('V', 12, struct blk_snap_snapshot_event) gives ENOTTY",
			 "number 12 crashes the kernel"))
		expect_errno("unknown command _IOW('V', 12, struct blk_snap_snapshot_event) gives ENOTTY",
			     xio(_IOW(BLK_SNAP, 12, struct blk_snap_snapshot_event), &ev), ENOTTY);
	if (defect_check("command of type 'X' (_IOW('X', 0, struct blk_snap_version)) gives ENOTTY",
			 "the type byte is not checked: 'X' number 0 runs VERSION"))
		expect_errno("command of type 'X' (_IOW('X', 0, struct blk_snap_version)) gives ENOTTY",
			     xio(_IOW('X', 0, struct blk_snap_version), &v), ENOTTY);
	expect_errno("command number 0 gives ENOTTY", xio(0, &v), ENOTTY);
	expect_errno("unknown command _IOW('V', 31, struct blk_snap_version) gives ENOTTY",
		     xio(_IOW(BLK_SNAP, 31, struct blk_snap_version), &v), ENOTTY);
	expect_errno("unknown command _IOW('V', 35, struct blk_snap_version) gives ENOTTY",
		     xio(_IOW(BLK_SNAP, 35, struct blk_snap_version), &v), ENOTTY);
	expect_errno("unknown command _IO('V', 0xff) gives ENOTTY", xio(_IO(BLK_SNAP, 0xff), NULL), ENOTTY);
}

/* Every command with a NULL and with an unmapped (0x8) argument pointer. */
static void test_bad_argument_pointers(void)
{
	static const struct {
		const char *name;
		unsigned long cmd;
		int err;
	} cmds[] = {
		{ "VERSION", IOCTL_BLK_SNAP_VERSION, ENODATA },
		{ "TRACKER_REMOVE", IOCTL_BLK_SNAP_TRACKER_REMOVE, ENODATA },
		{ "TRACKER_COLLECT", IOCTL_BLK_SNAP_TRACKER_COLLECT, ENODATA },
		{ "TRACKER_READ_CBT_MAP", IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, ENODATA },
		{ "TRACKER_MARK_DIRTY_BLOCKS", IOCTL_BLK_SNAP_TRACKER_MARK_DIRTY_BLOCKS, ENODATA },
		{ "SNAPSHOT_CREATE", IOCTL_BLK_SNAP_SNAPSHOT_CREATE, ENODATA },
		{ "SNAPSHOT_DESTROY", IOCTL_BLK_SNAP_SNAPSHOT_DESTROY, ENODATA },
		{ "SNAPSHOT_APPEND_STORAGE", IOCTL_BLK_SNAP_SNAPSHOT_APPEND_STORAGE, EINVAL },
		{ "SNAPSHOT_TAKE", IOCTL_BLK_SNAP_SNAPSHOT_TAKE, ENODATA },
		{ "SNAPSHOT_COLLECT", IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, ENODATA },
		{ "SNAPSHOT_COLLECT_IMAGES", IOCTL_BLK_SNAP_SNAPSHOT_COLLECT_IMAGES, ENODATA },
		{ "SNAPSHOT_WAIT_EVENT", IOCTL_BLK_SNAP_SNAPSHOT_WAIT_EVENT, EINVAL },
		{ "MOD", IOCTL_BLK_SNAP_MOD, ENODATA },
		{ "SETLOG", IOCTL_BLK_SNAP_SETLOG, ENODATA },
		{ "GET_SECTOR_STATE", IOCTL_BLK_SNAP_GET_SECTOR_STATE, ENODATA },
	};
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		expect_errno(DESC("%s with a NULL argument gives %s", cmds[i].name, errno_name(cmds[i].err)),
			     xio(cmds[i].cmd, NULL), cmds[i].err);
		expect_errno(DESC("%s with an unmapped argument (0x8) gives %s", cmds[i].name,
				  errno_name(cmds[i].err)),
			     xio(cmds[i].cmd, (void *)(uintptr_t)8), cmds[i].err);
	}
}

static void test_unknown_devices_and_ids(void)
{
	struct blk_snap_dev_t nd = no_such_dev;
	uint8_t map[16];
	struct blk_snap_block_range r = { 0, 8 };
	uuid_t id;

	expect_errno("CREATE with a device number that has no device (259:99999) gives ENXIO",
		     create_snapshot(&nd, 1, id), ENXIO);
	expect_errno("READ_CBT_MAP of 259:99999 gives ENXIO", read_cbt(nd, 0, sizeof(map), map), ENXIO);
	expect_errno("MARK_DIRTY_BLOCKS of 259:99999 gives ENXIO", mark_dirty(nd, &r, 1), ENXIO);
	expect_errno("TRACKER_REMOVE of 259:99999 gives ENOENT", tracker_remove(nd), ENOENT);
	expect_errno("GET_SECTOR_STATE of 259:99999 gives ENODEV", sector_state(nd, 0, NULL), ENODEV);

	/* STORAGE_DEV exists and is never tracked by the suite. */
	expect_errno("READ_CBT_MAP of an untracked device (STORAGE_DEV) gives ENODATA",
		     read_cbt(storage.id, 0, sizeof(map), map), ENODATA);
	expect_errno("MARK_DIRTY_BLOCKS of an untracked device (STORAGE_DEV) gives ENODEV",
		     mark_dirty(storage.id, &r, 1), ENODEV);
	expect_errno("TRACKER_REMOVE of an untracked device (STORAGE_DEV) gives ENODATA",
		     tracker_remove(storage.id), ENODATA);
	expect_errno("GET_SECTOR_STATE of a device that is not an image (STORAGE_DEV) gives ENODEV",
		     sector_state(storage.id, 0, NULL), ENODEV);

	if (unrouted_path) {
		struct blk_snap_dev_t u;
		char why[256];
		if (!dev_id_of(unrouted_path, &u, why, sizeof(why))) {
			check(false, "--unrouted names a block device", "a block device", "%s", why);
		} else {
			expect_errno(DESC("CREATE with the unrouted device %s (%u:%u) gives ENODEV",
					  unrouted_path, u.mj, u.mn),
				     create_snapshot(&u, 1, id), ENODEV);
			struct blk_snap_cbt_info *arr = NULL;
			long n = collect_trackers(&arr);
			check(n >= 0 && !find_tracker(arr, n, u),
			      "the refused CREATE of the unrouted device leaves it untracked",
			      "not listed by TRACKER_COLLECT", n < 0 ? "TRACKER_COLLECT failed" : "listed");
			free(arr);
		}
	} else {
		skip("CREATE with an unrouted device gives ENODEV", "no --unrouted DEV given");
	}

	/* An id no snapshot has. */
	uuid_t unknown;
	for (size_t i = 0; i < sizeof(unknown); i++)
		unknown[i] = (uint8_t)(0xa5 ^ (i * 37));
	struct blk_snap_snapshot_event ev;
	struct blk_snap_block_range sr = { 0, 2048 };
	uint32_t cnt = 0;
	expect_errno("DESTROY of an unknown id gives ENODEV", destroy_snapshot(unknown), ENODEV);
	expect_errno("APPEND_STORAGE to an unknown id gives ESRCH",
		     append_storage(unknown, storage.id, &sr, 1), ESRCH);
	expect_errno("TAKE of an unknown id gives ESRCH", take_snapshot(unknown), ESRCH);
	expect_errno("WAIT_EVENT on an unknown id gives ESRCH", wait_event(unknown, EVENT_TIMEOUT_MS, &ev), ESRCH);
	expect_errno("COLLECT_IMAGES of an unknown id gives ESRCH", collect_images(unknown, NULL, 0, &cnt), ESRCH);
}

/* State carried from one cycle to the next. */
static uint8_t gen1[16];
static uint8_t snapnum1_dev1, snapnum1_dev2;
static long trackers_at_start;

/* Block index of a byte offset. */
static uint32_t blk(uint64_t off, uint32_t blk_size) { return (uint32_t)(off / blk_size); }

/* Offsets used on the devices (all inside 64 MiB). */
#define OFF_A (1 * MiB)   /* DEV1: pattern A before TAKE 1, B after */
#define OFF_C (8 * MiB)   /* DEV1: written between the cycles */
#define OFF_Q (32 * MiB)  /* DEV1: never written */
#define OFF_D2 (2 * MiB)  /* DEV2: pattern before TAKE 1 */
#define OFF_Z (4 * MiB)   /* DEV2: MARK_DIRTY before TAKE 1 */
#define OFF_Y (6 * MiB)   /* DEV2: MARK_DIRTY after TAKE 1 */
#define OFF_W (10 * MiB)  /* DEV2: written through image 1 */

static void wait_first_event(const uuid_t id, const char *which)
{
	struct blk_snap_snapshot_event ev;
	long r = wait_event(id, EVENT_TIMEOUT_MS, &ev);
	if (!expect_ok(DESC("%s: WAIT_EVENT (100 ms) right after CREATE succeeds", which), r))
		return;
	expect_u64(DESC("%s: the first event's code is 0 (low free space)", which), ev.code, 0);
	struct blk_snap_event_low_free_space lfs;
	memcpy(&lfs, ev.data, sizeof(lfs));
	check(lfs.requested_nr_sect == diff_storage_minimum,
	      DESC("%s: the first event's requested_nr_sect is diff_storage_minimum", which),
	      "the --diff-storage-minimum value", "%" PRIu64 " (minimum %" PRIu64 ")",
	      (uint64_t)lfs.requested_nr_sect, diff_storage_minimum);
	uint64_t boot = now_ns(CLOCK_BOOTTIME);
	check(ev.time_label > 0 && (uint64_t)ev.time_label <= boot,
	      DESC("%s: the event's time_label is > 0 and in ns since boot", which),
	      "0 < time_label <= CLOCK_BOOTTIME now", "%" PRId64 " (boot clock %" PRIu64 ")",
	      (int64_t)ev.time_label, boot);
}

static void cycle1(void)
{
	struct blk_snap_dev_t both[2] = { dev1.id, dev2.id };
	uuid_t id;
	struct blk_snap_snapshot_event ev;
	uint32_t cnt;

	note("cycle 1: snapshot of DEV1 %s (%u:%u) and DEV2 %s (%u:%u)", dev1.path, dev1.id.mj,
	     dev1.id.mn, dev2.path, dev2.id.mj, dev2.id.mn);

	/* NULL pointers in struct fields. */
	expect_errno("CREATE with count 2 and a NULL dev_id_array gives ENODATA",
		     create_snapshot(NULL, 2, NULL), ENODATA);
	expect_errno("CREATE with count 2 and an unmapped dev_id_array (0x8) gives ENODATA",
		     create_snapshot((struct blk_snap_dev_t *)(uintptr_t)8, 2, NULL), ENODATA);

	struct blk_snap_dev_t dup[2] = { storage.id, storage.id };
	expect_errno("CREATE with the same device twice gives EINVAL", create_snapshot(dup, 2, NULL), EINVAL);
	if (defect_check("a refused CREATE leaves no tracker behind", "leaves the first device tracked")) {
		struct blk_snap_cbt_info *arr = NULL;
		long n = collect_trackers(&arr);
		check(n >= 0 && !find_tracker(arr, n, storage.id),
		      "a refused CREATE leaves no tracker behind (STORAGE_DEV not listed)",
		      "STORAGE_DEV not listed", n < 0 ? "TRACKER_COLLECT failed" : "listed");
		free(arr);
	}

	if (!expect_ok("CREATE with DEV1 and DEV2 succeeds", create_snapshot(both, 2, id))) {
		note("cannot go on with cycle 1");
		return;
	}
	check(!uuid_is_zero(id), "CREATE returns a non-zero id", "a non-zero id", "all zero");
	note("snapshot 1: %s", uuid_text(id));

	/* The point-in-time content, written after CREATE and before TAKE. */
	check(write_pattern(dev1.fd, OFF_A, 0xA), "write pattern A to DEV1 before TAKE", "written",
	      "%s", strerror(errno));
	check(write_pattern(dev2.fd, OFF_D2, 0xD2), "write a pattern to DEV2 before TAKE", "written",
	      "%s", strerror(errno));

	if (defect_check("CREATE with DEV1, already in a live snapshot, gives EBUSY",
			 "a device can be in two snapshots"))
		expect_errno("CREATE with DEV1, already in a live snapshot, gives EBUSY",
			     create_snapshot(&dev1.id, 1, NULL), EBUSY);

	wait_first_event(id, "snapshot 1");
	uint64_t t0 = now_ns(CLOCK_MONOTONIC);
	long r = wait_event(id, EVENT_TIMEOUT_MS, &ev);
	uint64_t ms = (now_ns(CLOCK_MONOTONIC) - t0) / 1000000;
	expect_errno("a second WAIT_EVENT (100 ms) with nothing queued gives ENOENT", r, ENOENT);
	if (defect_check("WAIT_EVENT's timeout is in milliseconds",
			 "the value is taken as jiffies (4x longer at HZ=250)"))
		check(ms >= 90 && ms < 390, "the empty WAIT_EVENT returns after about 100 ms (90..390 ms)",
		      "90..389 ms", "%" PRIu64 " ms", ms);

	/* SNAPSHOT_COLLECT: size with NULL, then fill. */
	struct blk_snap_snapshot_collect sc = { 12345, NULL };
	if (expect_ok("SNAPSHOT_COLLECT with NULL ids succeeds", xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &sc)))
		check(sc.count >= 1, "SNAPSHOT_COLLECT with NULL ids writes the count back (>= 1)", ">= 1",
		      "%u", sc.count);
	uint32_t nsnap = sc.count;
	uuid_t *ids = calloc(nsnap + 1, sizeof(uuid_t));
	sc.ids = ids;
	if (expect_ok("SNAPSHOT_COLLECT with an array of that count succeeds",
		      xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &sc))) {
		bool found = false;
		for (uint32_t i = 0; i < sc.count && i < nsnap; i++)
			found |= memcmp(ids[i], id, sizeof(uuid_t)) == 0;
		check(found, "SNAPSHOT_COLLECT lists the new id", "listed", "not listed (count %u)", sc.count);
	}
	free(ids);
	sc.count = 0;
	sc.ids = calloc(1, sizeof(uuid_t));
	expect_errno("SNAPSHOT_COLLECT with count 0 and an array gives ENODATA",
		     xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &sc), ENODATA);
	free(sc.ids);
	sc.count = 64;
	sc.ids = (uuid_t *)(uintptr_t)8;
	expect_errno("SNAPSHOT_COLLECT into an unmapped array (0x8) gives ENODATA",
		     xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &sc), ENODATA);

	/* Before TAKE. */
	struct blk_snap_image_info info[4];
	cnt = 77;
	expect_errno("COLLECT_IMAGES before TAKE gives ENODEV", collect_images(id, info, 4, &cnt), ENODEV);
	expect_u64("COLLECT_IMAGES before TAKE sets count to the device count (2)", cnt, 2);
	uint8_t map[64];
	expect_errno("READ_CBT_MAP of DEV1 before TAKE gives EPERM", read_cbt(dev1.id, 0, sizeof(map), map), EPERM);
	struct blk_snap_block_range z = { OFF_Z / SECTOR, IO_SIZE / SECTOR };
	expect_ok("MARK_DIRTY_BLOCKS of DEV2 before TAKE succeeds", mark_dirty(dev2.id, &z, 1));
	uint64_t sectors = dev1.size / SECTOR;
	struct blk_snap_block_range past[2] = { { sectors - 8, 16 }, { sectors, 1 } };
	expect_errno("MARK_DIRTY_BLOCKS of a range crossing DEV1's end gives EINVAL",
		     mark_dirty(dev1.id, &past[0], 1), EINVAL);
	expect_errno("MARK_DIRTY_BLOCKS of a range starting at DEV1's end gives EINVAL",
		     mark_dirty(dev1.id, &past[1], 1), EINVAL);
	expect_errno("MARK_DIRTY_BLOCKS with count 1 and a NULL array gives ENODATA",
		     mark_dirty(dev1.id, NULL, 1), ENODATA);
	expect_ok("MARK_DIRTY_BLOCKS with count 0 succeeds", mark_dirty(dev1.id, NULL, 0));

	/* TRACKER_COLLECT with two (more) trackers. */
	struct blk_snap_tracker_collect tc = { 999, NULL };
	if (expect_ok("TRACKER_COLLECT with a NULL array succeeds", xio(IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc)))
		expect_u64("TRACKER_COLLECT with a NULL array writes the count back (start + 2)", tc.count,
			   (uint64_t)trackers_at_start + 2);
	struct blk_snap_cbt_info small[1];
	tc.count = 1;
	tc.cbt_info_array = small;
	expect_errno("TRACKER_COLLECT with a too-small array (count 1) gives ENOBUFS",
		     xio(IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc), ENOBUFS);
	expect_u64("TRACKER_COLLECT with a too-small array leaves count unchanged (1)", tc.count, 1);
	tc.count = 64;
	tc.cbt_info_array = (struct blk_snap_cbt_info *)(uintptr_t)8;
	expect_errno("TRACKER_COLLECT into an unmapped array (0x8) gives ENODATA",
		     xio(IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc), ENODATA);

	/* TAKE without storage, then storage. */
	expect_errno("TAKE without difference storage gives EFAULT", take_snapshot(id), EFAULT);
	if (defect_check("the snapshot still exists after a TAKE without storage",
			 "TAKE without storage deletes the snapshot"))
		check(id_listed(id), "the snapshot still exists after a TAKE without storage (SNAPSHOT_COLLECT)",
		      "listed", "not listed");
	struct blk_snap_block_range one = { 0, 2048 };
	struct blk_snap_dev_t nd = no_such_dev;
	expect_errno("APPEND_STORAGE with ranges on 259:99999 gives ENXIO", append_storage(id, nd, &one, 1), ENXIO);
	expect_ok("APPEND_STORAGE with count 0 succeeds", append_storage(id, storage.id, NULL, 0));
	expect_errno("TAKE after an APPEND_STORAGE of count 0 still gives EFAULT", take_snapshot(id), EFAULT);
	expect_errno("APPEND_STORAGE with count 1 and a NULL ranges array gives ENODATA",
		     append_storage(id, storage.id, NULL, 1), ENODATA);
	struct blk_snap_block_range ranges[2] = { { 0, 16384 }, { 32768, 16384 } };
	expect_ok("APPEND_STORAGE of two ranges (16 MiB) on STORAGE_DEV succeeds",
		  append_storage(id, storage.id, ranges, 2));
	if (!expect_ok("TAKE succeeds", take_snapshot(id))) {
		note("cannot go on with cycle 1");
		destroy_snapshot(id);
		return;
	}
	expect_errno("TAKE twice gives EALREADY", take_snapshot(id), EALREADY);
	struct blk_snap_block_range more = { 16384, 8192 };
	expect_ok("APPEND_STORAGE after TAKE succeeds", append_storage(id, storage.id, &more, 1));
	check(id_listed(id), "SNAPSHOT_COLLECT lists the taken snapshot", "listed", "not listed");
	if (defect_check("CREATE with DEV1, in a taken snapshot, gives EBUSY", "a device can be in two snapshots"))
		expect_errno("CREATE with DEV1, in a taken snapshot, gives EBUSY",
			     create_snapshot(&dev1.id, 1, NULL), EBUSY);
	expect_errno("TRACKER_REMOVE of DEV1 in a taken snapshot gives EBUSY", tracker_remove(dev1.id), EBUSY);

	/* COLLECT_IMAGES. */
	cnt = 0;
	if (expect_ok("COLLECT_IMAGES with a NULL array succeeds", collect_images(id, NULL, 0, &cnt)))
		expect_u64("COLLECT_IMAGES with a NULL array sets count (2)", cnt, 2);
	cnt = 0;
	expect_errno("COLLECT_IMAGES with a too-small array (count 1) gives ENODATA",
		     collect_images(id, info, 1, &cnt), ENODATA);
	expect_u64("COLLECT_IMAGES with a too-small array sets count (2)", cnt, 2);
	expect_errno("COLLECT_IMAGES into an unmapped array (0x8) gives ENODATA",
		     collect_images(id, (struct blk_snap_image_info *)(uintptr_t)8, 4, NULL), ENODATA);
	memset(info, 0, sizeof(info));
	cnt = 0;
	struct blk_snap_dev_t img1 = { 0, 0 }, img2 = { 0, 0 };
	bool have1 = false, have2 = false;
	if (expect_ok("COLLECT_IMAGES with an array of 2 succeeds", collect_images(id, info, 2, &cnt))) {
		expect_u64("COLLECT_IMAGES returns count 2", cnt, 2);
		for (uint32_t i = 0; i < cnt && i < 2; i++) {
			if (same_dev(info[i].orig_dev_id, dev1.id)) {
				img1 = info[i].image_dev_id;
				have1 = true;
			} else if (same_dev(info[i].orig_dev_id, dev2.id)) {
				img2 = info[i].image_dev_id;
				have2 = true;
			}
		}
		check(have1 && have2, "COLLECT_IMAGES lists both originals", "DEV1 and DEV2",
		      "%u:%u and %u:%u", info[0].orig_dev_id.mj, info[0].orig_dev_id.mn,
		      info[1].orig_dev_id.mj, info[1].orig_dev_id.mn);
		check(have1 && have2 && !same_dev(img1, img2) && !same_dev(img1, dev1.id) &&
		      !same_dev(img2, dev2.id) && (img1.mj || img1.mn),
		      "the image device ids are distinct and differ from the originals",
		      "two new device ids", "%u:%u and %u:%u", img1.mj, img1.mn, img2.mj, img2.mn);
		note("images: DEV1 -> %u:%u, DEV2 -> %u:%u", img1.mj, img1.mn, img2.mj, img2.mn);
	}

	/* The images as block devices. */
	char path1[64], path2[64];
	snprintf(path1, sizeof(path1), "/dev/" BLK_SNAP_IMAGE_NAME "%u", img1.mn);
	snprintf(path2, sizeof(path2), "/dev/" BLK_SNAP_IMAGE_NAME "%u", img2.mn);
	struct stat st;
	int rs = have1 ? stat(path1, &st) : -1;
	bool node1 = rs == 0 && S_ISBLK(st.st_mode) && major(st.st_rdev) == img1.mj && minor(st.st_rdev) == img1.mn;
	check(node1, DESC("%s exists and is image 1's block device", path1), "a block node of the image",
	      rs != 0 ? "missing" : "another node");
	int fd1 = -1, fd2 = -1;
	if (node1) {
		fd1 = open(path1, O_RDWR | O_DIRECT | O_CLOEXEC);
		if (fd1 < 0 && errno == EINVAL)
			fd1 = open(path1, O_RDWR | O_CLOEXEC);
		check(fd1 >= 0, DESC("%s opens O_RDWR|O_DIRECT", path1), "an fd", "%s", strerror(errno));
	}
	if (fd1 >= 0) {
		uint64_t isz = 0;
		check(ioctl(fd1, BLKGETSIZE64, &isz) == 0 && isz == dev1.size,
		      "image 1's capacity equals DEV1's", "DEV1's size", "%" PRIu64 " (DEV1 %" PRIu64 ")",
		      isz, dev1.size);
	}

	/* Overwrite DEV1 after TAKE: the image keeps the point in time. */
	check(write_pattern(dev1.fd, OFF_A, 0xB), "overwrite DEV1 with pattern B after TAKE", "written",
	      "%s", strerror(errno));
	int c = compare_pattern(dev1.fd, OFF_A, 0xB);
	check(c == 1, "DEV1 reads pattern B", "the pattern", "%s", compare_text(c));
	if (fd1 >= 0) {
		c = compare_pattern(fd1, OFF_A, 0xA);
		check(c == 1, "image 1 reads pattern A (the content at TAKE)", "the pattern", "%s", compare_text(c));
	}
	if (have2) {
		rs = stat(path2, &st);
		check(rs == 0 && S_ISBLK(st.st_mode) && st.st_rdev == makedev(img2.mj, img2.mn),
		      DESC("%s exists and is image 2's block device", path2), "a block node of the image",
		      rs != 0 ? "missing" : "another node");
		fd2 = open(path2, O_RDWR | O_DIRECT | O_CLOEXEC);
		if (fd2 < 0 && errno == EINVAL)
			fd2 = open(path2, O_RDWR | O_CLOEXEC);
	}
	if (fd2 >= 0) {
		c = compare_pattern(fd2, OFF_D2, 0xD2);
		check(c == 1, "image 2 reads DEV2's pattern", "the pattern", "%s", compare_text(c));
		/* A write to an image lands in the difference storage only. */
		check(write_pattern(fd2, OFF_W, 0x77), "write a pattern to image 2", "written", "%s",
		      strerror(errno));
		c = compare_pattern(fd2, OFF_W, 0x77);
		check(c == 1, "image 2 reads back what was written to it", "the pattern", "%s", compare_text(c));
		c = compare_pattern(dev2.fd, OFF_W, 0x77);
		check(c == 0, "a write to image 2 does not reach DEV2", "different data", "%s", compare_text(c));
	} else {
		check(false, "image 2 opens", "an fd", "%s", strerror(errno));
	}

	/* TRACKER_COLLECT: both devices, their geometry and snap_number. */
	struct blk_snap_cbt_info *arr = NULL;
	long n = collect_trackers(&arr);
	const struct blk_snap_cbt_info *t1 = NULL, *t2 = NULL;
	if (expect_ok("TRACKER_COLLECT (size with NULL, then fill) succeeds", n)) {
		expect_u64("TRACKER_COLLECT lists start + 2 trackers", (uint64_t)n, (uint64_t)trackers_at_start + 2);
		t1 = find_tracker(arr, n, dev1.id);
		t2 = find_tracker(arr, n, dev2.id);
		check(t1 && t2, "TRACKER_COLLECT lists DEV1 and DEV2", "both", "%s%s", t1 ? "" : "no DEV1 ",
		      t2 ? "" : "no DEV2");
	}
	const struct { const struct blk_snap_cbt_info *t; const struct dev *dv; const char *name; } tk[2] = {
		{ t1, &dev1, "DEV1" }, { t2, &dev2, "DEV2" } };
	for (int i = 0; i < 2; i++) {
		const struct blk_snap_cbt_info *t = tk[i].t;
		if (!t)
			continue;
		uint64_t bs = expected_block_size(tk[i].dv->size);
		expect_u64(DESC("%s: device_capacity is the device size in bytes", tk[i].name),
			   t->device_capacity, tk[i].dv->size);
		expect_u64(DESC("%s: blk_size is %" PRIu64 " (2^16, doubled while over 2^21 blocks)", tk[i].name, bs),
			   t->blk_size, bs);
		expect_u64(DESC("%s: blk_count is capacity / blk_size, rounded up", tk[i].name), t->blk_count,
			   (tk[i].dv->size + bs - 1) / bs);
		expect_u64(DESC("%s: snap_number is 1 after the first TAKE", tk[i].name), t->snap_number, 1);
		check(!uuid_is_zero(t->generation_id), DESC("%s: generation_id is not zero", tk[i].name),
		      "non-zero", "zero");
	}
	if (t1) {
		memcpy(gen1, t1->generation_id, sizeof(gen1));
		snapnum1_dev1 = t1->snap_number;
	}
	if (t2)
		snapnum1_dev2 = t2->snap_number;

	/* READ_CBT_MAP. */
	if (t1 && t1->blk_size) {
		uint32_t bc = t1->blk_count, bs = t1->blk_size;
		uint8_t *m = calloc(bc + 64, 1);
		memset(m, 0xee, bc + 64);
		long got = read_cbt(dev1.id, 0, bc + 64, m);
		expect_ret("READ_CBT_MAP of DEV1 (whole map, length past the end) returns blk_count",
			   got, bc);
		if (got == (long)bc) {
			check(m[blk(OFF_A, bs)] == snapnum1_dev1,
			      "DEV1's map: the block written before TAKE holds snap_number",
			      "the tracker's snap_number", "%u (snap_number %u)", m[blk(OFF_A, bs)], snapnum1_dev1);
			check(m[blk(OFF_Q, bs)] == 0, "DEV1's map: a block never written holds 0", "0", "%u",
			      m[blk(OFF_Q, bs)]);
			check(m[bc] == 0xee, "READ_CBT_MAP writes no byte past the bytes it returns",
			      "untouched", "0x%02x", m[bc]);
		}
		expect_ret("READ_CBT_MAP of DEV1 at offset blk_count-10, length 100 returns 10 (clamped)",
			   read_cbt(dev1.id, bc - 10, 100, m), 10);
		expect_ret("READ_CBT_MAP of DEV1 at offset blk_count-1, length 1 returns 1",
			   read_cbt(dev1.id, bc - 1, 1, m), 1);
		if (defect_check("READ_CBT_MAP at or past the end returns 0",
				 "just past the end returns bytes from beyond the map")) {
			expect_ret("READ_CBT_MAP of DEV1 at offset blk_count returns 0", read_cbt(dev1.id, bc, 16, m), 0);
			expect_ret("READ_CBT_MAP of DEV1 at offset blk_count+5 returns 0",
				   read_cbt(dev1.id, bc + 5, 16, m), 0);
		}
		expect_ret("READ_CBT_MAP of DEV1 with length 0 returns 0", read_cbt(dev1.id, 0, 0, m), 0);
		expect_errno("READ_CBT_MAP of DEV1 into a NULL buff gives ENODATA",
			     read_cbt(dev1.id, 0, 16, NULL), ENODATA);
		expect_errno("READ_CBT_MAP of DEV1 into an unmapped buff (0x8) gives ENODATA",
			     read_cbt(dev1.id, 0, 16, (uint8_t *)(uintptr_t)8), ENODATA);
		free(m);
	}
	if (t2 && t2->blk_size) {
		uint32_t bc = t2->blk_count, bs = t2->blk_size;
		uint8_t *m = calloc(bc, 1);
		if (expect_ret("READ_CBT_MAP of DEV2 returns blk_count", read_cbt(dev2.id, 0, bc, m), bc)) {
			check(m[blk(OFF_Z, bs)] == snapnum1_dev2,
			      "DEV2's map: the block marked dirty before TAKE holds snap_number",
			      "the tracker's snap_number", "%u", m[blk(OFF_Z, bs)]);
			check(m[blk(OFF_Y, bs)] == 0, "DEV2's map: block Y is 0 before it is marked", "0", "%u",
			      m[blk(OFF_Y, bs)]);
		}
		struct blk_snap_block_range y = { OFF_Y / SECTOR, 8 };
		expect_ok("MARK_DIRTY_BLOCKS of DEV2 after TAKE succeeds", mark_dirty(dev2.id, &y, 1));
		if (expect_ret("READ_CBT_MAP of DEV2 after MARK_DIRTY returns blk_count", read_cbt(dev2.id, 0, bc, m), bc))
			check(m[blk(OFF_Y, bs)] == snapnum1_dev2,
			      "MARK_DIRTY after TAKE sets the read map's byte to snap_number (previous)",
			      "the tracker's snap_number", "%u", m[blk(OFF_Y, bs)]);
		free(m);
	}

	/* GET_SECTOR_STATE on image 1. */
	struct blk_snap_sector_state ss;
	if (have1 && expect_ok("GET_SECTOR_STATE of image 1 at the overwritten sector succeeds",
			       sector_state(img1, OFF_A / SECTOR, &ss))) {
		uint32_t copied = BLK_SNAP_CHUNK_ST_STORE_READY | BLK_SNAP_CHUNK_ST_STORING |
				  BLK_SNAP_CHUNK_ST_BUFFER_READY;
		check(ss.chunk_state & copied, "the overwritten chunk is copied (buffer ready, storing or stored)",
		      "BUFFER_READY|STORING|STORE_READY set", "chunk_state 0x%x", ss.chunk_state);
		check(!(ss.chunk_state & BLK_SNAP_CHUNK_ST_FAILED), "the overwritten chunk is not failed",
		      "FAILED clear", "chunk_state 0x%x", ss.chunk_state);
		check(ss.snap_number_prev == snapnum1_dev1 && ss.snap_number_curr == snapnum1_dev1 + 1,
		      "GET_SECTOR_STATE: snap_number_prev is the read map's byte, snap_number_curr the write map's",
		      "prev = snap_number, curr = snap_number + 1", "prev %u, curr %u (snap_number %u)",
		      ss.snap_number_prev, ss.snap_number_curr, snapnum1_dev1);
	}
	if (have1 && expect_ok("GET_SECTOR_STATE of image 1 at a sector never written succeeds",
			       sector_state(img1, OFF_Q / SECTOR, &ss)))
		check(!(ss.chunk_state & (BLK_SNAP_CHUNK_ST_STORE_READY | BLK_SNAP_CHUNK_ST_DIRTY)),
		      "a chunk never written is neither stored nor dirty", "STORE_READY and DIRTY clear",
		      "chunk_state 0x%x", ss.chunk_state);
	if (have2 && expect_ok("GET_SECTOR_STATE of image 2 at the sector written through it succeeds",
			       sector_state(img2, OFF_W / SECTOR, &ss)))
		check(ss.chunk_state & BLK_SNAP_CHUNK_ST_DIRTY, "the chunk written through image 2 is dirty",
		      "DIRTY set", "chunk_state 0x%x", ss.chunk_state);
	expect_errno("GET_SECTOR_STATE of DEV1 (an original, not an image) gives ENODEV",
		     sector_state(dev1.id, 0, NULL), ENODEV);
	free(arr);

	if (fd1 >= 0)
		close(fd1);
	if (fd2 >= 0)
		close(fd2);

	/* DESTROY and the destroyed id. */
	expect_ok("DESTROY succeeds", destroy_snapshot(id));
	check(!id_listed(id), "SNAPSHOT_COLLECT no longer lists the destroyed id", "not listed", "listed");
	if (have1)
		check(stat(path1, &st) != 0, DESC("%s is gone after DESTROY", path1), "no node", "still there");
	expect_errno("DESTROY of a destroyed id gives ENODEV", destroy_snapshot(id), ENODEV);
	struct blk_snap_block_range sr = { 0, 2048 };
	expect_errno("APPEND_STORAGE to a destroyed id gives ESRCH", append_storage(id, storage.id, &sr, 1), ESRCH);
	expect_errno("TAKE of a destroyed id gives ESRCH", take_snapshot(id), ESRCH);
	expect_errno("WAIT_EVENT on a destroyed id gives ESRCH", wait_event(id, EVENT_TIMEOUT_MS, &ev), ESRCH);
	expect_errno("COLLECT_IMAGES of a destroyed id gives ESRCH", collect_images(id, NULL, 0, NULL), ESRCH);
	expect_errno("READ_CBT_MAP of DEV1 after DESTROY gives EPERM", read_cbt(dev1.id, 0, sizeof(map), map), EPERM);
	if (have1)
		expect_errno("GET_SECTOR_STATE of the destroyed image 1 gives ENODEV",
			     sector_state(img1, 0, NULL), ENODEV);
	arr = NULL;
	n = collect_trackers(&arr);
	check(n >= 0 && find_tracker(arr, n, dev1.id) && find_tracker(arr, n, dev2.id),
	      "DEV1 and DEV2 stay tracked after DESTROY", "both listed", "not both listed");
	free(arr);
}

static void cycle2(void)
{
	struct blk_snap_dev_t both[2] = { dev1.id, dev2.id };
	uuid_t id;

	/* A write between the cycles (after TAKE 1, as B was). */
	check(write_pattern(dev1.fd, OFF_C, 0xC), "write pattern C to DEV1 between the cycles", "written",
	      "%s", strerror(errno));

	note("cycle 2");
	if (!expect_ok("cycle 2: CREATE with DEV1 and DEV2 succeeds", create_snapshot(both, 2, id)))
		return;
	wait_first_event(id, "snapshot 2");
	struct blk_snap_block_range ranges[1] = { { 0, 32768 } };
	expect_ok("cycle 2: APPEND_STORAGE succeeds", append_storage(id, storage.id, ranges, 1));
	if (!expect_ok("cycle 2: TAKE succeeds", take_snapshot(id))) {
		destroy_snapshot(id);
		return;
	}

	struct blk_snap_cbt_info *arr = NULL;
	long n = collect_trackers(&arr);
	const struct blk_snap_cbt_info *t1 = n > 0 ? find_tracker(arr, n, dev1.id) : NULL;
	const struct blk_snap_cbt_info *t2 = n > 0 ? find_tracker(arr, n, dev2.id) : NULL;
	check(t1 && t2, "cycle 2: TRACKER_COLLECT lists DEV1 and DEV2", "both", "not both");
	if (t1) {
		expect_u64("cycle 2: DEV1's snap_number went up by one", t1->snap_number, snapnum1_dev1 + 1u);
		check(memcmp(t1->generation_id, gen1, sizeof(gen1)) == 0,
		      "cycle 2: DEV1's generation_id is unchanged", "the same generation_id", "a new one");
		uint32_t bc = t1->blk_count, bs = t1->blk_size;
		uint8_t *m = calloc(bc, 1);
		if (bs && expect_ret("cycle 2: READ_CBT_MAP of DEV1 returns blk_count", read_cbt(dev1.id, 0, bc, m), bc)) {
			check(m[blk(OFF_A, bs)] > snapnum1_dev1,
			      "cycle 2: the block written after TAKE 1 holds a byte > the previous snap_number",
			      "> previous snap_number", "%u (previous %u)", m[blk(OFF_A, bs)], snapnum1_dev1);
			check(m[blk(OFF_C, bs)] > snapnum1_dev1,
			      "cycle 2: the block written between the cycles holds a byte > the previous snap_number",
			      "> previous snap_number", "%u (previous %u)", m[blk(OFF_C, bs)], snapnum1_dev1);
			check(m[blk(OFF_A, bs)] == t1->snap_number,
			      "cycle 2: that byte is the new snap_number", "the new snap_number", "%u (snap_number %u)",
			      m[blk(OFF_A, bs)], t1->snap_number);
			check(m[blk(OFF_Q, bs)] <= snapnum1_dev1,
			      "cycle 2: a block never written holds a byte <= the previous snap_number",
			      "<= previous snap_number", "%u", m[blk(OFF_Q, bs)]);
			unsigned changed = 0;
			for (uint32_t i = 0; i < bc; i++)
				changed += m[i] > snapnum1_dev1;
			expect_u64("cycle 2: exactly the two written blocks of DEV1 changed since snapshot 1",
				   changed, 2);
		}
		free(m);
	}
	if (t2) {
		uint32_t bc = t2->blk_count, bs = t2->blk_size;
		uint8_t *m = calloc(bc, 1);
		if (bs && expect_ret("cycle 2: READ_CBT_MAP of DEV2 returns blk_count", read_cbt(dev2.id, 0, bc, m), bc)) {
			check(m[blk(OFF_Y, bs)] > snapnum1_dev2,
			      "cycle 2: DEV2's block marked dirty after TAKE 1 holds a byte > the previous snap_number",
			      "> previous snap_number", "%u (previous %u)", m[blk(OFF_Y, bs)], snapnum1_dev2);
			check(m[blk(OFF_W, bs)] > snapnum1_dev2,
			      "cycle 2: DEV2's block written through image 1 holds a byte > the previous snap_number",
			      "> previous snap_number", "%u (previous %u)", m[blk(OFF_W, bs)], snapnum1_dev2);
			check(m[blk(OFF_Z, bs)] <= snapnum1_dev2,
			      "cycle 2: DEV2's block marked before TAKE 1 holds a byte <= the previous snap_number",
			      "<= previous snap_number", "%u", m[blk(OFF_Z, bs)]);
			check(m[blk(OFF_D2, bs)] <= snapnum1_dev2,
			      "cycle 2: DEV2's block written before TAKE 1 holds a byte <= the previous snap_number",
			      "<= previous snap_number", "%u", m[blk(OFF_D2, bs)]);
		}
		free(m);
	}
	free(arr);

	/* The new image shows the new point in time. */
	struct blk_snap_image_info info[2];
	uint32_t cnt = 0;
	if (expect_ok("cycle 2: COLLECT_IMAGES succeeds", collect_images(id, info, 2, &cnt))) {
		for (uint32_t i = 0; i < cnt && i < 2; i++) {
			if (!same_dev(info[i].orig_dev_id, dev1.id))
				continue;
			char path[64];
			snprintf(path, sizeof(path), "/dev/" BLK_SNAP_IMAGE_NAME "%u", info[i].image_dev_id.mn);
			int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
			if (fd < 0 && errno == EINVAL)
				fd = open(path, O_RDONLY | O_CLOEXEC);
			if (check(fd >= 0, DESC("cycle 2: %s opens", path), "an fd", "%s", strerror(errno))) {
				int c = compare_pattern(fd, OFF_A, 0xB);
				check(c == 1, "cycle 2: DEV1's image reads pattern B", "the pattern", "%s", compare_text(c));
				c = compare_pattern(fd, OFF_C, 0xC);
				check(c == 1, "cycle 2: DEV1's image reads pattern C", "the pattern", "%s", compare_text(c));
				close(fd);
			}
		}
	}
	expect_ok("cycle 2: DESTROY succeeds", destroy_snapshot(id));
}

static void test_empty_snapshot(void)
{
	const char *desc = "CREATE with count 0 succeeds with an empty snapshot";
	if (!defect_check(desc, "CREATE with count 0 spins 2^32 times"))
		return;
	uuid_t id;
	if (!expect_ok(desc, create_snapshot(NULL, 0, id)))
		return;
	/* A second live snapshot, to make SNAPSHOT_COLLECT's array too small. */
	uuid_t other;
	bool have_other = expect_ok("CREATE with DEV1 (a second live snapshot) succeeds",
				    create_snapshot(&dev1.id, 1, other));
	struct blk_snap_snapshot_collect sc = { 0, NULL };
	xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &sc);
	if (sc.count >= 2) {
		uint32_t want = sc.count;
		uuid_t *ids = calloc(want, sizeof(uuid_t));
		sc.count = want - 1;
		sc.ids = ids;
		expect_errno("SNAPSHOT_COLLECT with an array one too small gives ENODATA",
			     xio(IOCTL_BLK_SNAP_SNAPSHOT_COLLECT, &sc), ENODATA);
		free(ids);
	}
	uint32_t cnt = 99;
	expect_errno("COLLECT_IMAGES of the empty untaken snapshot gives ENODEV", collect_images(id, NULL, 0, &cnt),
		     ENODEV);
	expect_u64("COLLECT_IMAGES of the empty snapshot sets count 0", cnt, 0);
	struct blk_snap_block_range r = { 49152, 2048 };
	expect_ok("APPEND_STORAGE to the empty snapshot succeeds", append_storage(id, storage.id, &r, 1));
	expect_errno("TAKE of the empty snapshot (count 0) gives ENODEV", take_snapshot(id), ENODEV);
	expect_ok("DESTROY of the empty snapshot succeeds", destroy_snapshot(id));
	if (have_other)
		expect_ok("DESTROY of the second snapshot succeeds", destroy_snapshot(other));
}

static void teardown(void)
{
	expect_ok("TRACKER_REMOVE of DEV1 succeeds", tracker_remove(dev1.id));
	expect_ok("TRACKER_REMOVE of DEV2 succeeds", tracker_remove(dev2.id));
	expect_errno("TRACKER_REMOVE of DEV1 again gives ENODATA", tracker_remove(dev1.id), ENODATA);
	uint8_t m[16];
	expect_errno("READ_CBT_MAP of DEV1 after TRACKER_REMOVE gives ENODATA", read_cbt(dev1.id, 0, sizeof(m), m),
		     ENODATA);
	struct blk_snap_tracker_collect tc = { 999, NULL };
	if (expect_ok("TRACKER_COLLECT after TRACKER_REMOVE succeeds", xio(IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc)))
		expect_u64(trackers_at_start == 0 ? "TRACKER_COLLECT after TRACKER_REMOVE has count 0"
						  : "TRACKER_COLLECT after TRACKER_REMOVE is back to the start count",
			   tc.count, (uint64_t)trackers_at_start);
}

/* ---------------------------------------------------------------------- */

static void usage(void)
{
	fprintf(stderr,
		"usage: blksnap-conformance [--unrouted DEV] [--diff-storage-minimum N] [--skip-defect-checks]\n"
		"                           DEV1 DEV2 STORAGE_DEV\n");
}

/* Removes what an interrupted earlier run may have left (not counted). */
static void clean_slate(void)
{
	tracker_remove(dev1.id);
	tracker_remove(dev2.id);
}

int main(int argc, char **argv)
{
	const char *paths[3];
	int npaths = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--unrouted") && i + 1 < argc) {
			unrouted_path = argv[++i];
		} else if (!strcmp(argv[i], "--diff-storage-minimum") && i + 1 < argc) {
			char *end;
			diff_storage_minimum = strtoull(argv[++i], &end, 0);
			if (*end) {
				usage();
				return 2;
			}
		} else if (!strcmp(argv[i], "--skip-defect-checks")) {
			skip_defects = true;
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage();
			return 0;
		} else if (argv[i][0] == '-' && argv[i][1] == '-') {
			usage();
			return 2;
		} else if (npaths < 3) {
			paths[npaths++] = argv[i];
		} else {
			usage();
			return 2;
		}
	}
	if (npaths != 3) {
		usage();
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

	char why[512];
	if (!open_dev(&dev1, paths[0], why, sizeof(why)) || !open_dev(&dev2, paths[1], why, sizeof(why)) ||
	    !open_dev(&storage, paths[2], why, sizeof(why))) {
		printf("skipped: %s\n", why);
		return 77;
	}
	if (same_dev(dev1.id, dev2.id) || same_dev(dev1.id, storage.id) || same_dev(dev2.id, storage.id)) {
		printf("skipped: DEV1, DEV2 and STORAGE_DEV must be three different devices\n");
		return 77;
	}
	if (dev1.size < 64 * MiB || dev2.size < 64 * MiB || storage.size < 32 * MiB) {
		printf("skipped: DEV1 and DEV2 need 64 MiB, STORAGE_DEV 32 MiB\n");
		return 77;
	}
	if (posix_memalign(&io_buf, 4096, IO_SIZE) || posix_memalign(&cmp_buf, 4096, IO_SIZE)) {
		printf("skipped: out of memory\n");
		return 77;
	}
	/* The devices are there, so what cannot be opened now is the
	 * implementation under test: a failure, never a skip. */
	ctl = open("/dev/" BLK_SNAP_MODULE_NAME, O_RDWR);
	if (ctl < 0) {
		printf("not ok - /dev/" BLK_SNAP_MODULE_NAME " opens O_RDWR (got %s, expected an fd)\n", strerror(errno));
		printf("conformance: 0 passed, 1 failed\n");
		return 1;
	}
	note("DEV1 %s %u:%u (%" PRIu64 " bytes), DEV2 %s %u:%u (%" PRIu64 " bytes), STORAGE_DEV %s %u:%u",
	     dev1.path, dev1.id.mj, dev1.id.mn, dev1.size, dev2.path, dev2.id.mj, dev2.id.mn, dev2.size,
	     storage.path, storage.id.mj, storage.id.mn);

	clean_slate();
	struct blk_snap_tracker_collect tc = { 0, NULL };
	long r = xio(IOCTL_BLK_SNAP_TRACKER_COLLECT, &tc);
	if (expect_ok("TRACKER_COLLECT with a NULL array succeeds at the start", r))
		trackers_at_start = tc.count;
	note("trackers at the start: %ld", trackers_at_start);

	test_version_mod_setlog();
	test_unknown_commands();
	test_bad_argument_pointers();
	test_unknown_devices_and_ids();
	cycle1();
	cycle2();
	test_empty_snapshot();
	teardown();

	close(ctl);
	if (skipped)
		note("%u check(s) skipped", skipped);
	printf("conformance: %u passed, %u failed\n", passed, failed);
	return failed ? 1 : 0;
}
