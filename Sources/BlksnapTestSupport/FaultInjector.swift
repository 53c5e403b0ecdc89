import BlksnapEngine
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Which call of a `BlockDevice` a fault hits.
public enum FaultKind: String, Sendable, CaseIterable {
    case read, write, flush, discard
}

/// What an injected fault does to the call it hits.
///
/// `BlockDevice` has no short transfers: a call moves all its bytes or
/// throws. A short transfer is therefore the underlying device's partial
/// transfer (a prefix of the range read, written or discarded) followed by
/// the error, which is what a caller sees when a disk dies half-way through
/// a request. A flush cannot be partial: `short` fails it outright.
public enum FaultEffect: Sendable, Equatable, CustomStringConvertible {
    case fail(Errno)
    case short(Errno)
    case delay(microseconds: Int)

    public var description: String {
        switch self {
        case .fail(let e): return "fail \(e)"
        case .short(let e): return "short+\(e)"
        case .delay(let us): return "delay \(us)us"
        }
    }
}

/// One fault that was injected, in the order they happened.
public struct InjectedFault: Sendable, CustomStringConvertible {
    public let device: String
    public let kind: FaultKind
    public let offset: UInt64
    public let length: UInt64
    public let effect: FaultEffect
    /// Bytes the underlying device moved before the error (short only).
    public let done: UInt64
    /// Which call of this kind on this device it was, counted from 0 since
    /// the last `reseed`: two calls at the same place are told apart.
    public let call: Int

    /// The errno the call threw; nil for a delay.
    public var errno: Errno? {
        switch effect {
        case .fail(let e), .short(let e): return e
        case .delay: return nil
        }
    }

    public var description: String {
        "\(device) \(kind) \(offset)+\(length): \(effect)" + (done > 0 ? " after \(done) bytes" : "")
    }
}

/// When faults strike. Rules are checked in order; the first that fires
/// decides. A device name filter of nil matches every device.
public struct FaultRule: Sendable {
    public enum When: Sendable {
        /// Each matching call with this probability (0...1), from the seed.
        case random(Double)
        /// The matching calls with these ordinals (0 = the first matching call).
        case calls(Set<Int>)
        /// Every matching call from the one with this ordinal on: a disk that dies.
        case from(Int)
    }

    public var devices: Set<String>?
    public var kinds: Set<FaultKind>
    public var when: When
    /// Picked uniformly from the seed when the rule fires.
    public var effects: [FaultEffect]

    public init(devices: Set<String>? = nil, kinds: Set<FaultKind> = Set(FaultKind.allCases), when: When,
                effects: [FaultEffect]) {
        precondition(!effects.isEmpty, "a fault rule needs at least one effect")
        self.devices = devices
        self.kinds = kinds
        self.when = when
        self.effects = effects
    }
}

/// The seeded source of faults shared by every `FaultyBlockDevice` of a rig,
/// so one seed drives them all and one log orders all their faults.
///
/// Injection can be paused (`isEnabled = false`), so a test's own checks
/// read the truth beneath the faults without spending the schedule.
public final class FaultInjector: @unchecked Sendable {
    private let lock = Lock()
    private var state: UInt64
    private var rules: [FaultRule]
    private var matched: [Int]
    private var _log: [InjectedFault] = []
    private var _enabled = true
    private var _calls = 0
    private var ordinals: [String: Int] = [:]

    public let seed: UInt64

    public init(seed: UInt64, rules: [FaultRule] = []) {
        self.seed = seed
        state = seed
        self.rules = rules
        matched = Array(repeating: 0, count: rules.count)
    }

    public var isEnabled: Bool {
        get { lock.withLock { _enabled } }
        set { lock.withLock { _enabled = newValue } }
    }

    /// Replaces the rules; ordinals count afresh.
    public func setRules(_ new: [FaultRule]) {
        lock.withLock {
            rules = new
            matched = Array(repeating: 0, count: new.count)
        }
    }

    /// Restarts the random sequence (ordinals of the rules go on counting).
    /// Call ordinals of `InjectedFault` count afresh.
    public func reseed(_ seed: UInt64) {
        lock.withLock {
            state = seed
            ordinals.removeAll(keepingCapacity: true)
        }
    }

    /// Every fault injected so far.
    public var log: [InjectedFault] { lock.withLock { _log } }

    /// The faults injected since the last drain, and forgets them.
    public func drain() -> [InjectedFault] {
        lock.withLock {
            defer { _log.removeAll(keepingCapacity: true) }
            return _log
        }
    }

    /// Calls that reached the injector while it was enabled.
    public var calls: Int { lock.withLock { _calls } }

    /// SplitMix64: the same generator as the tests', so a printed seed replays.
    private func next() -> UInt64 {
        var generator = SplitMix64(seed: state)
        defer { state = generator.state }
        return generator.next()
    }

    /// The fault for one call, if any; how many bytes a short one moves.
    func decide(device: String, kind: FaultKind, length: UInt64, alignment: Int)
        -> (effect: FaultEffect, done: UInt64, call: Int)? {
        lock.withLock {
            guard _enabled else { return nil }
            _calls += 1
            let key = "\(device)/\(kind)"
            let call = ordinals[key, default: 0]
            ordinals[key] = call + 1
            for i in rules.indices {
                let rule = rules[i]
                guard rule.kinds.contains(kind), rule.devices?.contains(device) ?? true else { continue }
                let ordinal = matched[i]
                matched[i] += 1
                let fires: Bool
                switch rule.when {
                case .random(let p): fires = Double(next() >> 11) / Double(1 << 53) < p
                case .calls(let set): fires = set.contains(ordinal)
                case .from(let first): fires = ordinal >= first
                }
                guard fires else { continue }
                var effect = rule.effects[Int(next() % UInt64(rule.effects.count))]
                var done: UInt64 = 0
                if case .short(let e) = effect {
                    let unit = UInt64(max(alignment, 1))
                    if kind == .flush || length < unit {
                        effect = .fail(e)
                    } else {
                        // Strictly less than the whole: a short transfer never completes.
                        done = (next() % (length / unit)) * unit
                        if done >= length { done = 0 }
                    }
                }
                return (effect, done, call)
            }
            return nil
        }
    }

    func record(_ fault: InjectedFault) { lock.withLock { _log.append(fault) } }
}
