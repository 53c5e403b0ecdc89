// The CUSE frontend: /dev/blksnap as a CUSE character device (in progress).
