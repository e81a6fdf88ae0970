// libFuzzer entry point: to be written (scripts/fuzz.sh builds it with -sanitize=fuzzer).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt { 0 }

#if !FUZZING
/// Without libFuzzer: replays the inputs named on the command line.
@main
struct Replay {
  static func main() {}
}
#endif
