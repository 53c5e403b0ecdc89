import CFuse3
#if canImport(Glibc)
import Glibc
#endif

/// The libfuse callbacks of /dev/blksnap. They are C function pointers, so
/// none captures anything: each finds its device through the session's
/// userdata, an unretained `CUSEDevice` that outlives the session.
enum CUSEOperations {
    static func table() -> cuse_lowlevel_ops {
        var ops = cuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let conn else { return }
            CUSEOperations.device(userdata).sessionSaid(major: conn.pointee.proto_major, minor: conn.pointee.proto_minor)
        }
        ops.init_done = { userdata in
            CUSEOperations.device(userdata).sessionInitialized()
        }
        // Each request is counted while its handler runs (InFlightRecord).
        ops.open = { req, fi in
            let record = CUSEOperations.device(fuse_req_userdata(req)).inFlight
            record?.begin(); defer { record?.end() }
            _ = fuse_reply_open(req, fi)
        }
        ops.release = { req, _ in
            let record = CUSEOperations.device(fuse_req_userdata(req)).inFlight
            record?.begin(); defer { record?.end() }
            _ = fuse_reply_err(req, 0)
        }
        // The module's control device has no read or write: the VFS
        // answers EINVAL to both.
        ops.read = { req, _, _, _ in
            _ = fuse_reply_err(req, EINVAL)
        }
        ops.write = { req, _, _, _, _ in
            _ = fuse_reply_err(req, EINVAL)
        }
        ops.ioctl = { req, command, argument, _, flags, input, inputSize, outputSize in
            guard let req else { return }
            let record = CUSEOperations.device(fuse_req_userdata(req)).inFlight
            record?.begin(); defer { record?.end() }
            let request = IoctlRequest(
                command: UInt32(bitPattern: command),
                argument: UInt64(UInt(bitPattern: argument)),
                input: inputSize > 0 ? Array(UnsafeRawBufferPointer(start: input, count: inputSize)) : [],
                outputSize: outputSize,
                compat: flags & UInt32(FUSE_IOCTL_COMPAT) != 0)
            // The calling thread, in our pid namespace (0 if not visible).
            let pid = fuse_req_ctx(req)?.pointee.pid ?? 0
            let answer = CUSEOperations.device(fuse_req_userdata(req)).machine.handle(request, caller: ProcessMemory(pid: pid))
            CUSEOperations.reply(req, answer)
        }
        return ops
    }

    private static func device(_ userdata: UnsafeMutableRawPointer?) -> CUSEDevice {
        Unmanaged<CUSEDevice>.fromOpaque(userdata!).takeUnretainedValue()
    }

    private static func reply(_ req: fuse_req_t, _ answer: IoctlAnswer) {
        switch answer {
        case .error(let errno):
            _ = fuse_reply_err(req, errno)
        case .retry(let input, let output):
            let ins = input.map(iovec.init(region:))
            let outs = output.map(iovec.init(region:))
            _ = ins.withUnsafeBufferPointer { i in
                outs.withUnsafeBufferPointer { o in
                    fuse_reply_ioctl_retry(req, i.baseAddress, i.count, o.baseAddress, o.count)
                }
            }
        case .reply(let result, let data):
            _ = data.withUnsafeBytes { fuse_reply_ioctl(req, result, $0.baseAddress, $0.count) }
        }
    }
}

extension iovec {
    /// An iovec naming caller memory: the kernel, not us, dereferences it.
    init(region: CallerRegion) {
        self.init(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(region.address)), iov_len: region.count)
    }
}
