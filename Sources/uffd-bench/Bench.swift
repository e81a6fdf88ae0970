import CLinux
import Glibc
import LinuxSupport
import Userfaultfd

/// The benchmark driver: this process is the client. It starts the broker and
/// plugin roles once, runs every mode round-robin for R rounds on fresh
/// memory, verifies every page, and reports medians.
enum Bench {
  static func run(_ options: BenchOptions, arguments: [String]) -> Int32 {
    let loadBefore = Report.loadAverage()
    print("# command: " + arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " "))
    print("# \(options.pages) pages x 4 KiB per round, \(options.rounds) rounds, modes interleaved round-robin:")
    for mode in options.modes { print("#   \(Format.left(mode.name, 16)) (item \(mode.item)) \(mode.summary)") }
    fflush(nil)
    guard systemPageSize == 4096 else {
      Console.error("this benchmark assumes 4 KiB pages (the system's are \(systemPageSize))")
      return 1
    }
    if options.modes.contains(where: { $0.workload.backend != .plain }) && !UserfaultFD.isSupported {
      Console.error("userfaultfd is not available to this process (run as root or set vm.unprivileged_userfaultfd=1)")
      return 1
    }

    // Before any thread exists: SIGINT/SIGTERM are blocked in every thread and
    // read by the watchdog, which cleans up (children, sockets) and exits.
    let signals = clinux_signalfd([SIGINT, SIGTERM], 2)
    var plugins: [PluginInstance] = []
    for mode in options.modes where mode.usesBroker {
      for plugin in mode.workload.plugins where !plugins.contains(plugin) { plugins.append(plugin) }
    }
    let processes: BenchProcesses?
    do {
      processes = plugins.isEmpty ? nil : try BenchProcesses(plugins: plugins)
    } catch {
      Console.error("cannot start the broker and plugins: \(error)")
      return 1
    }
    let watchdog = Watchdog(processes: processes, signals: signals)
    let runner = RoundRunner(pages: options.pages, modes: options.modes, processes: processes, watchdog: watchdog)

    var results: [RoundResult] = []
    var failure: BenchError?
    rounds: for round in 1...options.rounds {
      for mode in options.modes {
        do {
          let result = try runner.run(mode, round: round)
          results.append(result)
          print(Report.roundLine(result, rounds: options.rounds))
          fflush(nil)
        } catch {
          failure = error
          break rounds
        }
      }
    }
    watchdog.stop()
    processes?.shutdown()
    // Nothing is left to clean up: SIGINT/SIGTERM may end the process again.
    var termination = sigset_t()
    sigemptyset(&termination)
    sigaddset(&termination, SIGINT)
    sigaddset(&termination, SIGTERM)
    pthread_sigmask(SIG_UNBLOCK, &termination, nil)
    if let failure {
      Console.error("FAILED: \(failure)")
      return 1
    }

    Report.summary(results, modes: options.modes, options: options)
    if options.microIterations > 0 {
      do {
        Report.micro(try Micro.run(iterations: options.microIterations), iterations: options.microIterations)
      } catch {
        Console.error("FAILED: \(error)")
        return 1
      }
    }
    Report.machine(loadBefore: loadBefore)
    let wrong = results.reduce(0) { $0 + $1.wrongPages }
    if wrong > 0 {
      print("FAILED: \(wrong) pages read back wrong (see WRONG PAGE lines)")
      return 1
    }
    print("all pages verified in every round")
    return 0
  }
}
