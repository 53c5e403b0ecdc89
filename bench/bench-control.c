/*
 * bench-control: round-trip latency of /dev/blksnap calls, printed side by
 * side with a plain ioctl on an unrelated descriptor (the floor). Run it
 * through the preload shim (tools/bench-control does) or against any real
 * /dev/blksnap. Prints figures; asserts nothing.
 *
 * usage: bench-control DEVICE STORAGE_DEVICE [VERSION_CALLS]
 *   DEVICE: a routed device of at least 4 GiB (64 KiB of CBT map at the
 *   default 64 KiB tracking block); STORAGE_DEVICE: a routed device whose
 *   sectors may hold the difference storage.
 */
#define _GNU_SOURCE
#include <blksnap/blk_snap.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void report(const char *what, double *t, int n)
{
	qsort(t, n, sizeof(double), cmp);
	printf("%-44s %8.1f us median %8.1f us p99   (%d calls)\n", what, t[n / 2], t[n * 99 / 100], n);
}

static struct blk_snap_dev_t dev_of(const char *path)
{
	struct stat st;
	if (stat(path, &st) != 0 || !S_ISBLK(st.st_mode)) {
		fprintf(stderr, "bench-control: %s is not a block device\n", path);
		exit(2);
	}
	return (struct blk_snap_dev_t){ major(st.st_rdev), minor(st.st_rdev) };
}

static void must(int ok, const char *what)
{
	if (!ok) {
		fprintf(stderr, "bench-control: %s: %s\n", what, strerror(errno));
		exit(1);
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: bench-control DEVICE STORAGE_DEVICE [VERSION_CALLS]\n");
		return 2;
	}
	int calls = argc > 3 ? atoi(argv[3]) : 100000;
	double *t = calloc(calls, sizeof(double));

	/* The floor: a cheap ioctl on a descriptor that is not ours. */
	int pipefd[2];
	must(pipe(pipefd) == 0, "pipe");
	for (int i = 0; i < calls; i++) {
		int n;
		double s = now_us();
		ioctl(pipefd[0], FIONREAD, &n);
		t[i] = now_us() - s;
	}
	report("plain ioctl(FIONREAD) on a pipe (floor)", t, calls);

	int fd = open("/dev/blksnap", O_RDWR);
	must(fd >= 0, "open /dev/blksnap");
	for (int i = 0; i < calls; i++) {
		struct blk_snap_version v;
		double s = now_us();
		must(ioctl(fd, IOCTL_BLK_SNAP_VERSION, &v) == 0, "VERSION");
		t[i] = now_us() - s;
	}
	report("VERSION", t, calls);

	/* A taken snapshot, so the device's CBT map can be read. */
	struct blk_snap_dev_t dev = dev_of(argv[1]), store = dev_of(argv[2]);
	struct blk_snap_snapshot_create create = { .count = 1, .dev_id_array = &dev };
	must(ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_CREATE, &create) == 0, "SNAPSHOT_CREATE");
	struct blk_snap_block_range range = { .sector_offset = 0, .sector_count = 1 << 16 };
	struct blk_snap_snapshot_append_storage append = { .dev_id = store, .count = 1, .ranges = &range };
	memcpy(append.id, create.id, sizeof(uuid_t));
	must(ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_APPEND_STORAGE, &append) == 0, "APPEND_STORAGE");
	struct blk_snap_snapshot_take take;
	memcpy(take.id, create.id, sizeof(uuid_t));
	must(ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_TAKE, &take) == 0, "TAKE");

	int reads = calls / 10;
	static unsigned char map[64 << 10];
	struct blk_snap_tracker_read_cbt_bitmap rd = { .dev_id = dev, .offset = 0, .length = sizeof(map), .buff = map };
	for (int i = 0; i < reads; i++) {
		double s = now_us();
		int r = ioctl(fd, IOCTL_BLK_SNAP_TRACKER_READ_CBT_MAP, &rd);
		t[i] = now_us() - s;
		if (r != (int)sizeof(map)) {
			fprintf(stderr, "bench-control: READ_CBT_MAP returned %d, wanted %zu (is %s 4 GiB?)\n", r, sizeof(map), argv[1]);
			return 1;
		}
	}
	report("TRACKER_READ_CBT_MAP, 64 KiB", t, reads);

	struct blk_snap_snapshot_destroy destroy;
	memcpy(destroy.id, create.id, sizeof(uuid_t));
	ioctl(fd, IOCTL_BLK_SNAP_SNAPSHOT_DESTROY, &destroy);
	struct blk_snap_tracker_remove remove = { .dev_id = dev };
	ioctl(fd, IOCTL_BLK_SNAP_TRACKER_REMOVE, &remove);
	close(fd);
	return 0;
}
