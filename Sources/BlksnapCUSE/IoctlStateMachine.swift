import BlksnapEngine
#if canImport(Glibc)
import Glibc
#endif

/// One ioctl over CUSE, decided request by request without libfuse.
///
/// CUSE delivers an unrestricted ioctl as a series of FUSE_IOCTL requests:
/// the server names the caller memory it needs with a retry, the kernel
/// copies it in and asks again. Each request carries everything needed to
/// know where the call stands (what was fetched, how much was declared for
/// output), so the machine keeps no state between requests:
///
/// 1. nothing fetched: retry for the struct at the argument (also declared
///    for output when the command writes it back);
/// 2. the struct is in: if its pointer field designates an array, retry for
///    [struct, array]; otherwise dispatch;
/// 3. struct and array are in: dispatch.
///
/// The dispatcher therefore runs once per ioctl, in the last round, and
/// never more than one round follows the struct's. Every output region is
/// fetched as input as well, because the kernel copies the reply data over
/// the output iovecs from their start: bytes the dispatcher leaves alone
/// go back as they were.
///
/// A region is named only after `CallerAccess` says it can be copied: the
/// kernel would otherwise fail the whole ioctl with EFAULT, where the
/// module answers ENODATA (EINVAL for APPEND_STORAGE and WAIT_EVENT). A
/// region left out reads as a failed copy, and the dispatcher gives the
/// module's errno for it.
public struct IoctlStateMachine: Sendable {
    public typealias Dispatch = @Sendable (_ command: UInt32, _ argument: UInt64, _ memory: any CallerMemory) -> ControlReply

    /// The most bytes one CUSE ioctl moves each way: the kernel's
    /// FUSE_DEFAULT_MAX_PAGES_PER_REQ (32 pages), which CUSE never raises.
    /// Larger arrays (READ_CBT_MAP into the CLI's 1 MiB buffer) go through
    /// `CallerAccess` directly instead.
    public static var kernelTransferLimit: Int { 32 * Int(sysconf(Int32(_SC_PAGESIZE))) }

    public let transferLimit: Int
    private let dispatch: Dispatch

    public init(control: Control, transferLimit: Int = IoctlStateMachine.kernelTransferLimit) {
        self.init(transferLimit: transferLimit) { control.dispatch(command: $0, argument: $1, memory: $2) }
    }

    init(transferLimit: Int, dispatch: @escaping Dispatch) {
        self.transferLimit = transferLimit
        self.dispatch = dispatch
    }

    public func handle(_ request: IoctlRequest, caller: some CallerAccess) -> IoctlAnswer {
        // Struct layouts are LP64; a 32-bit caller's would be misread.
        guard !request.compat, let layout = CommandLayout(number: request.command, argument: request.argument) else {
            return .error(ENOTTY)
        }
        let argument = layout.argumentRegion
        if request.input.isEmpty {
            return firstRound(layout, caller)
        }
        guard request.input.count >= argument.count else {
            return firstRound(layout, caller)
        }
        let argumentBytes = Array(request.input.prefix(argument.count))
        let fetchedArgument = (region: argument, bytes: argumentBytes)
        let argumentOutputs: [[CallerRegion]] = layout.argumentIsOutput ? [[argument], []] : [[]]

        guard let array = layout.array(in: argumentBytes) else {
            guard request.input.count == argument.count else { return firstRound(layout, caller) }
            let outputs = declared(argumentOutputs, size: request.outputSize)
            return finish(layout, FetchedMemory(fetched: [fetchedArgument], outputs: outputs), caller)
        }
        // The module allocates the array in the kernel first and fails so.
        guard array.count <= Control.arrayLimit else { return .error(ENOMEM) }
        let arrayOutputs = layout.arrayIsOutput ? [array] : []
        let fits = argument.count + array.count <= transferLimit

        if request.input.count == argument.count {
            let outputs = declared(argumentOutputs, size: request.outputSize)
            let usable = Self.canRead(array, caller) && (!layout.arrayIsOutput || Self.canWrite(array, caller))
            guard usable else {
                return finish(layout, FetchedMemory(fetched: [fetchedArgument], outputs: outputs), caller)
            }
            guard fits else {
                let direct = FetchedMemory.Direct(region: array, writable: layout.arrayIsOutput, access: caller)
                return finish(layout, FetchedMemory(fetched: [fetchedArgument], outputs: outputs, direct: direct), caller)
            }
            return .retry(input: [argument, array], output: outputs + arrayOutputs)
        }

        // The struct fetched with the array no longer designates what was
        // fetched (another thread of the caller changed it between rounds):
        // start over from the struct rather than act on a mix. (A pointer
        // moved to an array of the very same size cannot be told apart.)
        guard fits, request.input.count == argument.count + array.count else {
            return firstRound(layout, caller)
        }
        let candidates = layout.argumentIsOutput ? [[argument] + arrayOutputs, arrayOutputs] : [arrayOutputs]
        let fetchedArray = (region: array, bytes: Array(request.input[argument.count...]))
        let memory = FetchedMemory(fetched: [fetchedArgument, fetchedArray],
                                   outputs: declared(candidates, size: request.outputSize))
        return finish(layout, memory, caller)
    }

    /// Asks for the struct, or dispatches at once when it cannot be read:
    /// naming it would only earn the kernel's EFAULT.
    private func firstRound(_ layout: CommandLayout, _ caller: some CallerAccess) -> IoctlAnswer {
        let argument = layout.argumentRegion
        guard Self.canRead(argument, caller) else { return finish(layout, FetchedMemory(), caller) }
        let output = layout.argumentIsOutput && Self.canWrite(argument, caller) ? [argument] : []
        return .retry(input: [argument], output: output)
    }

    /// A span that wraps the address space can never be copied, whatever
    /// the caller's access says (a blind one says yes to everything): the
    /// module's errno for it, not the kernel's EFAULT for naming it.
    private static func canRead(_ region: CallerRegion, _ caller: some CallerAccess) -> Bool {
        region.end != nil && caller.canRead(region)
    }

    private static func canWrite(_ region: CallerRegion, _ caller: some CallerAccess) -> Bool {
        region.end != nil && caller.canWrite(region)
    }

    /// Which of the possible output declarations the previous retry made,
    /// told by the size the kernel reports; none if it matches none.
    private func declared(_ candidates: [[CallerRegion]], size: Int) -> [CallerRegion] {
        candidates.first { $0.reduce(0) { $0 + $1.count } == size } ?? []
    }

    /// Runs the dispatcher once and shapes its reply for the kernel.
    private func finish(_ layout: CommandLayout, _ memory: FetchedMemory, _ caller: some CallerAccess) -> IoctlAnswer {
        let reply = dispatch(layout.number, layout.argument, memory)
        if let direct = memory.direct, direct.writable {
            for write in reply.writes {
                let span = CallerRegion(address: write.address, count: write.bytes.count)
                guard let (here, there) = direct.region.overlap(span) else { continue }
                guard caller.write(Array(write.bytes[there]), at: direct.region.address + UInt64(here.lowerBound)) else {
                    // As the module's failed copy_to_user; the commands
                    // with output arrays change nothing, so nothing is lost.
                    return .error(ENODATA)
                }
            }
        }
        let data = OutputLayout(regions: memory.outputs).data(writes: reply.writes, originals: memory)
        return .reply(result: reply.kernelResult, data: data)
    }
}
