#!/usr/bin/env python3
"""A minimal blksnap v1 client for the shell scenarios: each sub-command is
one or two ioctls on /dev/blksnap, with the structs of <blksnap/blk_snap.h>
built by ctypes. Run it under `blksnapctl exec` so the preload shim carries
the calls to blksnapd (or directly where a real /dev/blksnap exists).

Usage:
  blksnap_ioctl.py create DEV...            -> prints the snapshot id
  blksnap_ioctl.py append ID FILE           -> FILE's extents (FIEMAP) on its st_dev
  blksnap_ioctl.py append-device ID DEV [SECTORS] -> DEV's first SECTORS (default: all)
  blksnap_ioctl.py take ID
  blksnap_ioctl.py images ID                -> "ORIG_MJ:MN IMAGE_MJ:MN" per line
  blksnap_ioctl.py waitevent ID TIMEOUT_MS  -> "CODE DATA-HEX" or exit 2 (ENOENT)
  blksnap_ioctl.py cbt DEV                  -> "SNAP_NUMBER BLOCK_SIZE HEXMAP"
  blksnap_ioctl.py collect                  -> "MJ:MN GENERATION SNAP_NUMBER BLOCK_SIZE BLOCK_COUNT" per tracker
  blksnap_ioctl.py destroy ID
  blksnap_ioctl.py remove DEV
"""
import ctypes, errno, os, sys, uuid

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

def IOC(d, t, nr, size): return (d << 30) | (size << 16) | (ord(t) << 8) | nr
IOW = lambda nr, size: IOC(1, 'V', nr, size)
IOR = lambda nr, size: IOC(2, 'V', nr, size)

class DevT(ctypes.Structure): _fields_ = [("mj", ctypes.c_uint32), ("mn", ctypes.c_uint32)]
class Range(ctypes.Structure): _fields_ = [("sector_offset", ctypes.c_uint64), ("sector_count", ctypes.c_uint64)]
class Create(ctypes.Structure): _fields_ = [("count", ctypes.c_uint32), ("dev_id_array", ctypes.POINTER(DevT)), ("id", ctypes.c_uint8 * 16)]
class Id(ctypes.Structure): _fields_ = [("id", ctypes.c_uint8 * 16)]
class Append(ctypes.Structure): _fields_ = [("id", ctypes.c_uint8 * 16), ("dev_id", DevT), ("count", ctypes.c_uint32), ("ranges", ctypes.POINTER(Range))]
class ImageInfo(ctypes.Structure): _fields_ = [("orig_dev_id", DevT), ("image_dev_id", DevT)]
class CollectImages(ctypes.Structure): _fields_ = [("id", ctypes.c_uint8 * 16), ("count", ctypes.c_uint32), ("image_info_array", ctypes.POINTER(ImageInfo))]
class Event(ctypes.Structure): _fields_ = [("id", ctypes.c_uint8 * 16), ("timeout_ms", ctypes.c_uint32), ("code", ctypes.c_uint32), ("time_label", ctypes.c_int64), ("data", ctypes.c_uint8 * 4064)]
class CbtInfo(ctypes.Structure): _fields_ = [("dev_id", DevT), ("blk_size", ctypes.c_uint32), ("device_capacity", ctypes.c_uint64), ("blk_count", ctypes.c_uint32), ("generation_id", ctypes.c_uint8 * 16), ("snap_number", ctypes.c_uint8)]
class TrackerCollect(ctypes.Structure): _fields_ = [("count", ctypes.c_uint32), ("cbt_info_array", ctypes.POINTER(CbtInfo))]
class ReadCbt(ctypes.Structure): _fields_ = [("dev_id", DevT), ("offset", ctypes.c_uint32), ("length", ctypes.c_uint32), ("buff", ctypes.POINTER(ctypes.c_uint8))]
class TrackerRemove(ctypes.Structure): _fields_ = [("dev_id", DevT)]

assert ctypes.sizeof(Append) == 40 and ctypes.sizeof(Event) == 4096 and ctypes.sizeof(CbtInfo) == 48

# The request numbers by command number; `blksnap_ioctl.py numbers` prints
# them, and tools/test compares that with what <blksnap/blk_snap.h> gives.
NUMBERS = {0: IOW(0, 8), 1: IOW(1, 8), 2: IOW(2, 16), 3: IOR(3, 24), 5: IOW(5, 32), 6: IOR(6, 16),
           7: IOW(7, 40), 8: IOR(8, 16), 10: IOW(10, 32), 11: IOW(11, 4096)}

def call(fd, nr, arg, writes_arg=True):
    r = libc.ioctl(fd, NUMBERS[nr], ctypes.addressof(arg))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r

def dev_of(path):
    st = os.stat(path)
    rdev = st.st_rdev
    return DevT(os.major(rdev), os.minor(rdev))

def uuid_bytes(text): return (ctypes.c_uint8 * 16)(*uuid.UUID(text).bytes)

def fiemap(path):
    """Physical extents of a file, in bytes: [(physical, length)]."""
    class Extent(ctypes.Structure):
        _fields_ = [("logical", ctypes.c_uint64), ("physical", ctypes.c_uint64), ("length", ctypes.c_uint64),
                    ("r1", ctypes.c_uint64 * 2), ("flags", ctypes.c_uint32), ("r2", ctypes.c_uint32 * 3)]
    n = 512
    class Fiemap(ctypes.Structure):
        _fields_ = [("start", ctypes.c_uint64), ("length", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                    ("mapped", ctypes.c_uint32), ("count", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                    ("extents", Extent * n)]
    FS_IOC_FIEMAP = 0xC020660B
    out, start = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            fm = Fiemap(start=start, length=(1 << 64) - 1 - start, flags=1, count=n)  # FIEMAP_FLAG_SYNC
            if libc.ioctl(fd, FS_IOC_FIEMAP, ctypes.addressof(fm)) < 0:
                raise OSError(ctypes.get_errno(), "FIEMAP")
            if fm.mapped == 0:
                return out
            last = False
            for e in fm.extents[:fm.mapped]:
                out.append((e.physical, e.length))
                start = e.logical + e.length
                last = last or (e.flags & 1)  # FIEMAP_EXTENT_LAST
            if last:
                return out
    finally:
        os.close(fd)

def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "numbers":
        for nr, number in sorted(NUMBERS.items()):
            print(f"{nr} {number:#x}")
        return 0
    fd = os.open("/dev/blksnap", os.O_RDWR)
    if cmd == "create":
        devs = (DevT * len(args))(*[dev_of(a) for a in args])
        arg = Create(count=len(args), dev_id_array=devs)
        call(fd, 5, arg)
        print(uuid.UUID(bytes=bytes(arg.id)))
    elif cmd == "append":
        st = os.stat(args[1])
        ranges = [Range(p // 512, l // 512) for p, l in fiemap(args[1])]
        arr = (Range * len(ranges))(*ranges)
        arg = Append(id=uuid_bytes(args[0]), dev_id=DevT(os.major(st.st_dev), os.minor(st.st_dev)),
                     count=len(ranges), ranges=arr)
        call(fd, 7, arg)
    elif cmd == "append-device":
        sectors = int(args[2]) if len(args) > 2 else os.stat(args[1]).st_size // 512 or \
            int(open(f"/sys/dev/block/{os.major(os.stat(args[1]).st_rdev)}:{os.minor(os.stat(args[1]).st_rdev)}/size").read())
        arr = (Range * 1)(Range(0, sectors))
        call(fd, 7, Append(id=uuid_bytes(args[0]), dev_id=dev_of(args[1]), count=1, ranges=arr))
    elif cmd in ("take", "destroy"):
        call(fd, 8 if cmd == "take" else 6, Id(id=uuid_bytes(args[0])))
    elif cmd == "images":
        arg = CollectImages(id=uuid_bytes(args[0]), count=0)
        call(fd, 10, arg)
        arr = (ImageInfo * arg.count)()
        arg.image_info_array = arr
        call(fd, 10, arg)
        for i in arr:
            print(f"{i.orig_dev_id.mj}:{i.orig_dev_id.mn} {i.image_dev_id.mj}:{i.image_dev_id.mn}")
    elif cmd == "waitevent":
        arg = Event(id=uuid_bytes(args[0]), timeout_ms=int(args[1]))
        try:
            call(fd, 11, arg)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return 2
            raise
        print(arg.code, bytes(arg.data[:16]).hex())
    elif cmd == "cbt":
        target = dev_of(args[0])
        tc = TrackerCollect(count=0)
        call(fd, 2, tc)
        infos = (CbtInfo * tc.count)()
        tc.cbt_info_array = infos
        call(fd, 2, tc)
        info = next(i for i in infos if (i.dev_id.mj, i.dev_id.mn) == (target.mj, target.mn))
        buf = (ctypes.c_uint8 * info.blk_count)()
        got = call(fd, 3, ReadCbt(dev_id=target, offset=0, length=info.blk_count, buff=buf))
        assert got == info.blk_count, (got, info.blk_count)
        print(info.snap_number, info.blk_size, bytes(buf).hex())
    elif cmd == "collect":
        tc = TrackerCollect(count=0)
        call(fd, 2, tc)
        infos = (CbtInfo * tc.count)()
        tc.cbt_info_array = infos
        call(fd, 2, tc)
        for i in infos[:tc.count]:
            print(f"{i.dev_id.mj}:{i.dev_id.mn} {uuid.UUID(bytes=bytes(i.generation_id))} {i.snap_number} {i.blk_size} {i.blk_count}")
    elif cmd == "remove":
        call(fd, 1, TrackerRemove(dev_id=dev_of(args[0])))
    else:
        print(__doc__, file=sys.stderr)
        return 64
    os.close(fd)
    return 0

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except OSError as e:
        print(f"blksnap_ioctl: {' '.join(sys.argv[1:3])}: {e.strerror} (errno {e.errno})", file=sys.stderr)
        sys.exit(1)
