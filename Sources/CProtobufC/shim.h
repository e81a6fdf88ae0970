/* libprotobuf-c (Debian: libprotobuf-c-dev), the runtime of the generated code in CBrokerWire. */
#include <protobuf-c/protobuf-c.h>
