/*
 * CBlksnapBackup: the Linux calls blksnap-backup needs that Swift cannot
 * reach directly (FS_IOC_FIEMAP is a function-like macro over a struct with
 * a flexible array; fallocate needs _GNU_SOURCE), and the SIGINT/SIGTERM
 * flag that a signal handler may touch (a sig_atomic_t, nothing else).
 */
#ifndef CBLKSNAPBACKUP_H
#define CBLKSNAPBACKUP_H

#include <stdint.h>
#include <sys/types.h>

/* One extent of a file as FIEMAP reports it, in bytes. */
struct bkp_extent {
	uint64_t logical;
	uint64_t physical;
	uint64_t length;
	uint32_t flags;
};

extern const uint32_t bkp_fiemap_extent_last;
extern const uint32_t bkp_fiemap_extent_unknown;
extern const uint32_t bkp_fiemap_extent_encoded;
extern const uint32_t bkp_fiemap_extent_delalloc;
extern const uint32_t bkp_fiemap_extent_not_aligned;
extern const int bkp_o_direct;

/* FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC from `start`: fills up to `max`
 * extents and sets *mapped. 0, or -1 with errno. */
int bkp_fiemap(int fd, uint64_t start, struct bkp_extent *out, uint32_t max, uint32_t *mapped);

/* fallocate(fd, 0, 0, length): real preallocation, never written zeroes. */
int bkp_fallocate(int fd, off_t length);

/* SIGINT and SIGTERM set a flag (and no SA_RESTART, so blocking calls
 * return EINTR); bkp_interrupted() returns the signal number or 0. */
void bkp_catch_interrupts(void);
int bkp_interrupted(void);

/* pipe2(fds, O_CLOEXEC). */
int bkp_pipe_cloexec(int fds[2]);

/* makedev/major/minor are macros in glibc. */
unsigned int bkp_major(dev_t dev);
unsigned int bkp_minor(dev_t dev);

#endif
