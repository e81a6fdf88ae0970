/* Header-only: every wrapper is static inline in include/CUserfaultfd.h. SwiftPM needs one source file. */
