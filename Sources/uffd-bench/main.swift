import Glibc

// uffd-bench: the benchmark of issue 5, and the broker and plugin roles it spawns from itself.
exit(Bench.main(CommandLine.arguments))
