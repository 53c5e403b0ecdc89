import BlksnapEngine
#if canImport(Glibc)
import Glibc
#endif

/// Runs a system tool (dmsetup) and waits for it: its exit status and what
/// it printed, standard output and error together, for the log line that
/// says why it failed.
public func runCommand(_ arguments: [String]) -> (status: Int32, output: String) {
    var pipeFds: [Int32] = [-1, -1]
    guard pipe(&pipeFds) == 0 else { return (-1, "pipe: \(String(cString: strerror(errno)))") }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, pipeFds[1], 1)
    posix_spawn_file_actions_adddup2(&actions, pipeFds[1], 2)
    posix_spawn_file_actions_addclose(&actions, pipeFds[0])
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    var argv = arguments.map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid = pid_t()
    let rc = posix_spawnp(&pid, arguments[0], &actions, nil, &argv, environ)
    close(pipeFds[1])
    guard rc == 0 else {
        close(pipeFds[0])
        return (127, "cannot run \(arguments[0]): \(String(cString: strerror(rc)))")
    }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(pipeFds[0], $0.baseAddress!, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        output += chunk[0..<n]
    }
    close(pipeFds[0])
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let exited = status & 0x7f == 0
    return (exited ? (status >> 8) & 0xff : 128 + (status & 0x7f), String(decoding: output, as: UTF8.self))
}
