/*
 * CBlksnapLinux: Linux calls and constants that Swift's Glibc module does
 * not import without _GNU_SOURCE, exported as prefixed functions and values
 * (the CNIOLinux pattern).
 */
#ifndef CBLKSNAPLINUX_H
#define CBLKSNAPLINUX_H

#include <stdint.h>
#include <sys/types.h>
#include <linux/loop.h>

extern const int blksnap_o_direct;

/* fallocate(2) with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE. */
int blksnap_punch_hole(int fd, off_t offset, off_t length);


/* SO_PEERCRED of a connected Unix socket; 0 or -1 with errno. */
int blksnap_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid);

/* 1 when the peer of a connected Unix socket has `gid` among its groups
 * (SO_PEERGROUPS, the supplementary groups SO_PEERCRED leaves out), 0 when
 * not, -1 with errno when the kernel cannot say. */
int blksnap_peer_in_group(int fd, gid_t gid);

/* accept4(fd, NULL, NULL, SOCK_CLOEXEC). */
int blksnap_accept_cloexec(int fd);

/* Block and filesystem ioctls whose numbers are function-like macros. */
extern const unsigned long blksnap_ioctl_fifreeze;
extern const unsigned long blksnap_ioctl_fithaw;
extern const unsigned long blksnap_ioctl_blkflsbuf;
extern const unsigned long blksnap_ioctl_blkgetsize64;

int blksnap_syncfs(int fd);

/* The kernel nbd driver over generic netlink (nbd_netlink.c); each returns
 * 0 or -errno (-ENOENT: the nbd module is not loaded). */
int blksnap_nbd_available(void);
int blksnap_nbd_connect(uint32_t index, int sockfd, uint64_t size, uint64_t block_size,
			uint64_t server_flags, uint64_t timeout_s, uint64_t dead_timeout_s,
			const char *backend);
int blksnap_nbd_reconfigure(uint32_t index, int sockfd, uint64_t dead_timeout_s, const char *backend);
int blksnap_nbd_disconnect(uint32_t index);

/* makedev/major/minor are macros in glibc. */
dev_t blksnap_makedev(unsigned int major, unsigned int minor);
unsigned int blksnap_major(dev_t dev);
unsigned int blksnap_minor(dev_t dev);

#endif
