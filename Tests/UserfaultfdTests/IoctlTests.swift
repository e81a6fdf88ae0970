// UserfaultFD itself: creating, adopting, registering, and the resolving ioctls
// with the outcomes the kernel really reports (DESIGN §2). No dispatcher here:
// these uffds ask for no events, so munmap/madvise never wait for a reader.

import Glibc
import LinuxSupport
import SystemPackage
import Testing
import Userfaultfd

extension UserfaultfdKernelTests {
  @Suite("UserfaultFD ioctls") struct Ioctls {
    @Test("UFFDIO_COPY fills the pages with the source bytes")
    func copyFillsPages() throws {
      try withFixture(pages: 4, features: []) { f in
        let buffer = PageBuffer(pages: 2)
        buffer.preparePattern(for: f.region.page(1), pages: 2)
        #expect(f.uffd.copy(to: f.region.page(1), from: buffer.pointer, length: 2 * pageSize) == .done)
        #expect(content(ofPage: f.region.page(1)) == .pattern)
        #expect(content(ofPage: f.region.page(2)) == .pattern)
      }
    }

    @Test("A copy whose source cannot be read is .failed(EFAULT), not a crash (sources may be a plugin's memory)")
    func copyFromUnreadableSource() throws {
      try withFixture(pages: 1, features: []) { f in
        let source = try #require(mmap(nil, pageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(source, pageSize) }
        #expect(f.uffd.copy(to: f.region.page(0), from: UnsafeRawPointer(source), length: pageSize) == .failed(.badAddress))
        // Nothing was mapped: a good copy still fills the page.
        let buffer = PageBuffer(pages: 1)
        buffer.preparePattern(for: f.region.page(0), pages: 1)
        #expect(f.uffd.copy(to: f.region.page(0), from: buffer.pointer, length: pageSize) == .done)
        #expect(content(ofPage: f.region.page(0)) == .pattern)
      }
    }

    @Test("A copy from a file mapping past the file's end is .failed(EFAULT), not SIGBUS (the broker's delegated file that shrank)")
    func copyFromShrunkFile() throws {
      try withFixture(pages: 2, features: []) { f in
        var template = Array("/tmp/uffd-shrunk-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        try #require(fd >= 0)
        defer { close(fd); template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) } }
        let page = [UInt8](repeating: 0x5A, count: pageSize)
        #expect(write(fd, page, pageSize) == pageSize && write(fd, page, pageSize) == pageSize)
        let mapping = try #require(mmap(nil, 2 * pageSize, PROT_READ, MAP_SHARED, fd, 0))
        defer { munmap(mapping, 2 * pageSize) }
        #expect(ftruncate(fd, off_t(pageSize)) == 0)
        #expect(f.uffd.copy(to: f.region.page(1), from: UnsafeRawPointer(mapping + pageSize), length: pageSize) == .failed(.badAddress))
        #expect(f.uffd.copy(to: f.region.page(0), from: UnsafeRawPointer(mapping), length: pageSize) == .done)
        #expect(load(f.region.page(0)) == UInt64(0x5A5A_5A5A_5A5A_5A5A))
      }
    }

    @Test("UFFDIO_ZEROPAGE maps zeros; a later write copies on write")
    func zeroMapsZeros() throws {
      try withFixture(pages: 2, features: []) { f in
        #expect(f.uffd.zero(address: f.region.page(0), length: pageSize) == .done)
        #expect(content(ofPage: f.region.page(0)) == .zeros)
        store(42, at: f.region.page(0) + 8)
        #expect(load(f.region.page(0) + 8) == 42)
      }
    }

    @Test("UFFDIO_WRITEPROTECT, and a copy in write-protect mode: a write blocks in the kernel until the page is unprotected, then lands")
    func writeProtect() throws {
      try withFixture(pages: 2, features: [], register: false) { f in
        try f.uffd.register(address: f.region.lowerBound, length: 2 * pageSize, mode: [.missing, .writeProtect])
        let buffer = PageBuffer(pages: 2)
        buffer.preparePattern(for: f.region.page(0), pages: 2)
        #expect(f.uffd.copy(to: f.region.page(0), from: buffer.pointer, length: pageSize) == .done)
        #expect(throws: Never.self) { try f.uffd.writeProtect(address: f.region.page(0), length: pageSize, protect: true).get() }
        #expect(f.uffd.copy(to: f.region.page(1), from: buffer.pointer + pageSize, length: pageSize, writeProtect: true) == .done)
        for page in [f.region.page(0), f.region.page(1)] {
          #expect(content(ofPage: page) == .pattern)  // reads pass
          let writer = f.spawn { store(42, at: page + 8) }
          try #require(waitUntil("the writer to block in its write-protect fault") { isBlockedInUserfaultfd(writer.tid) })
          #expect(load(page + 8) != 42)
          #expect(throws: Never.self) { try f.uffd.writeProtect(address: page, length: pageSize, protect: false).get() }
          try #require(f.join(writer))
          #expect(load(page + 8) == 42)
        }
      }
    }

    @Test("UFFDIO_POISON marks a missing page: poisoning it again is EEXIST; a later copy replaces the marker")
    func poisonMarksPage() throws {
      try withFixture(pages: 2, features: []) { f in
        #expect(f.uffd.poison(address: f.region.page(0), length: pageSize) == .done)
        #expect(f.uffd.poison(address: f.region.page(0), length: pageSize) == .alreadyPresent)
        // The kernel lets a fill replace the marker (a region failed closed can be served again).
        let buffer = PageBuffer()
        buffer.preparePattern(for: f.region.page(0))
        #expect(f.uffd.copy(to: f.region.page(0), from: buffer.pointer, length: pageSize) == .done)
        #expect(content(ofPage: f.region.page(0)) == .pattern)
      }
    }

    @Test("A DONTWAKE copy fills without waking; UFFDIO_WAKE releases the faulting thread")
    func dontWakeThenWake() throws {
      try withFixture(pages: 2, features: []) { f in
        let page = f.region.page(0)
        let seen = Shared<PageContent?>(nil)
        let reader = f.spawn { seen.value = content(ofPage: page) }
        try #require(waitUntil("the reader to block in its fault") { isBlockedInUserfaultfd(reader.tid) })

        let buffer = PageBuffer()
        buffer.preparePattern(for: page)
        #expect(f.uffd.copy(to: page, from: buffer.pointer, length: pageSize, wake: false) == .done)
        // A wake happens inside the ioctl (the woken thread is running from then on, its wait
        // channel gone): still waiting in the fault now means it was not woken.
        #expect(isBlockedInUserfaultfd(reader.tid), "a DONTWAKE copy must leave the faulting thread asleep")

        #expect((try? f.uffd.wake(address: page, length: pageSize).get()) != nil)
        f.join(reader)
        #expect(seen.value == .pattern)
        // Waking a range nobody waits on is harmless.
        #expect((try? f.uffd.wake(address: f.region.page(1), length: pageSize).get()) != nil)
      }
    }

    /// What the kernel does (mm/userfaultfd.c, mfill_atomic + userfaultfd_copy):
    /// the copy proceeds page by page and stops at the first page that exists;
    /// if some pages were filled, `copy` holds their byte count and the ioctl
    /// fails with EAGAIN (→ `.partial`); if none were, `copy` is -EEXIST and
    /// the ioctl fails with EEXIST (→ `.alreadyPresent`).
    @Test("Copying over a page that exists mid-range is partial, then already present")
    func partialCopy() throws {
      try withFixture(pages: 4, features: []) { f in
        #expect(f.uffd.zero(address: f.region.page(2), length: pageSize) == .done)
        let buffer = PageBuffer(pages: 4)
        buffer.preparePattern(for: f.region.page(0), pages: 4)
        #expect(f.uffd.copy(to: f.region.page(0), from: buffer.pointer, length: 4 * pageSize) == .partial(bytes: 2 * pageSize))
        // The remainder starts at the present page: nothing is done at all.
        let rest = buffer.pointer + 2 * pageSize
        #expect(f.uffd.copy(to: f.region.page(2), from: rest, length: 2 * pageSize) == .alreadyPresent)
        #expect(f.uffd.copy(to: f.region.page(3), from: rest + pageSize, length: pageSize) == .done)

        #expect(content(ofPage: f.region.page(0)) == .pattern)
        #expect(content(ofPage: f.region.page(1)) == .pattern)
        #expect(content(ofPage: f.region.page(2)) == .zeros)
        #expect(content(ofPage: f.region.page(3)) == .pattern)
      }
    }

    @Test("Filling a page that exists is .alreadyPresent and leaves it unchanged")
    func alreadyPresent() throws {
      try withFixture(pages: 1, features: []) { f in
        let page = f.region.page(0)
        let buffer = PageBuffer()
        buffer.preparePattern(for: page)
        #expect(f.uffd.copy(to: page, from: buffer.pointer, length: pageSize) == .done)
        buffer.prepareZeros()
        #expect(f.uffd.copy(to: page, from: buffer.pointer, length: pageSize) == .alreadyPresent)
        #expect(f.uffd.zero(address: page, length: pageSize) == .alreadyPresent)
        #expect(content(ofPage: page) == .pattern)
      }
    }

    @Test("Filling a range that was unmapped, or is not registered, is .rangeGone")
    func rangeGone() throws {
      try withFixture(pages: 4, features: []) { f in
        let buffer = PageBuffer()
        buffer.prepareZeros()
        f.unmap(f.region.pages(2..<4))
        #expect(f.uffd.copy(to: f.region.page(2), from: buffer.pointer, length: pageSize) == .rangeGone)
        #expect(f.uffd.zero(address: f.region.page(3), length: pageSize) == .rangeGone)
        // A copy must lie inside one registered vma: one that runs into the hole is refused whole.
        let two = PageBuffer(pages: 2)
        two.prepareZeros()
        #expect(f.uffd.copy(to: f.region.page(1), from: two.pointer, length: 2 * pageSize) == .rangeGone)
        #expect(f.uffd.copy(to: f.region.page(1), from: buffer.pointer, length: pageSize) == .done)

        let unregistered = try mapAnonymous(pages: 1)
        f.own(unregistered)
        #expect(f.uffd.copy(to: unregistered.lowerBound, from: buffer.pointer, length: pageSize) == .rangeGone)
      }
    }

    @Test("PagefaultResult(settling:) maps each outcome to resolved or redeliver")
    func settling() throws {
      try withFixture(pages: 1, features: []) { f in
        let page = f.region.page(0)
        func settle(_ outcome: IoctlOutcome) -> PagefaultResult {
          PagefaultResult(settling: outcome, address: page, length: pageSize, on: f.uffd)
        }
        #expect(settle(.done) == .resolved)
        #expect(settle(.alreadyPresent) == .resolved)
        #expect(settle(.rangeGone) == .resolved)
        #expect(settle(.targetExited) == .resolved)
        #expect(settle(.notNow) == .notNow)
        #expect(settle(.partial(bytes: pageSize)) == .notNow)
        #expect(settle(.failed(.invalidArgument)) == .notNow)
      }
    }

    @Test("Registering a misaligned range is .invalidRange")
    func misalignedRegister() throws {
      try withFixture(pages: 2, features: [], register: false) { f in
        #expect {
          try f.uffd.register(address: f.region.lowerBound + 100, length: pageSize)
        } throws: { ($0 as? UserfaultFDError)?.code == .invalidRange }
        let ioctls = try f.uffd.register(address: f.region.lowerBound, length: f.region.length)
        #expect(ioctls.contains(.copy) && ioctls.contains(.zeropage) && ioctls.contains(.wake))
      }
    }
  }

  @Suite("Creating and adopting") struct Creation {
    @Test("Adopting a pipe or /dev/null is .notAUserfaultfd and leaves the descriptor open")
    func adoptingNonUserfaultfd() throws {
      var ends: [CInt] = [-1, -1]
      try #require(pipe(&ends) == 0)
      let null = open("/dev/null", O_RDWR | O_CLOEXEC)
      try #require(null >= 0)
      defer { for fd in ends + [null] { closeDescriptor(fd) } }

      for fd in [ends[0], ends[1], null] {
        #expect {
          _ = try UserfaultFD(adopting: FileDescriptor(rawValue: fd), features: .nonCooperative)
        } throws: { ($0 as? UserfaultFDError)?.code == .notAUserfaultfd }
        #expect(fcntl(fd, F_GETFD) >= 0, "the caller still owns a refused descriptor")
      }
    }

    @Test("Adopting a real userfaultfd works and registers ranges")
    func adoptingUserfaultfd() throws {
      let created = try UserfaultFD.create(features: [])
      let adopted = try UserfaultFD(adopting: created.release(), features: [], ioctls: created.ioctls)
      let region = try mapAnonymous(pages: 1)
      defer { _ = munmap(region.pointer, region.length) }
      try adopted.register(address: region.lowerBound, length: region.length)
      #expect(adopted.zero(address: region.lowerBound, length: pageSize) == .done)
      #expect(fcntl(adopted.fileDescriptor.rawValue, F_GETFL) & O_NONBLOCK != 0)
    }

    @Test("Asking for a feature bit the kernel does not know is .featureUnavailable naming it")
    func unknownFeature() throws {
      let unknown = UserfaultFD.Features(rawValue: 1 << 40)
      #expect {
        _ = try UserfaultFD.create(features: [.threadID, unknown])
      } throws: { ($0 as? UserfaultFDError)?.code == .featureUnavailable(unknown) }
    }

    @Test("The features a kernel offers include the non-cooperative events")
    func probe() throws {
      let available = try UserfaultFD.probeFeatures()
      #expect(available.isSuperset(of: .nonCooperative))
      #expect(UserfaultFD.isSupported)
    }

    // UFFDIO_API reports every feature the kernel supports, not the ones
    // enabled (fs/userfaultfd.c): `features` must be the enabled set.
    @Test("`features` of a created uffd are the features enabled on it")
    func grantedFeaturesAreTheRequestedOnes() throws {
      let plain = try UserfaultFD.create(features: [])
      let withThreadIDs = try UserfaultFD.create(features: [.threadID])
      #expect(plain.features == [])
      #expect(withThreadIDs.features == [.threadID])
    }

    // Only `required` must be offered; optional features the kernel lacks are dropped.
    @Test("An optional feature the kernel lacks does not fail create when `required` excludes it")
    func optionalFeatureMayBeMissing() throws {
      let unknown = UserfaultFD.Features(rawValue: 1 << 40)
      let uffd = try UserfaultFD.create(features: [.threadID, unknown], required: [.threadID])
      #expect(uffd.features.contains(.threadID))
      #expect(!uffd.features.contains(unknown))
    }
  }
}
