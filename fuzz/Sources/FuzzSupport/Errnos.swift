#if canImport(Glibc)
import Glibc
#endif

/// Every errno ABI-v1.md lets a blksnap ioctl fail with, plus ENOMEM for a
/// huge array (the module's failed kcalloc) and ERANGE for a number that
/// does not fit. Anything else from the dispatcher is a broken promise.
public let abiErrnos: Set<Int32> = [
    ENOTTY, EINVAL, ENODATA, ENOMEM, ENODEV, ENXIO, ENOENT, EBUSY, ESRCH, EFAULT, EPERM,
    ENOSPC, ENOBUFS, EINTR, EALREADY, ERANGE,
]
