// For CPluginTests: a broker that refuses a plugin before reading its Hello, as
// the broker does (its Error queued, then the connection shut down), on one end
// of a socket pair handed to uffd_plugin_connect as UFFD_BROKER_PLUGIN_FD. The
// Hello's send fails (EPIPE); the SDK must report the broker's Error instead.
//   refused    -- prints "probe: EPIPE" then "errno N: LAST_ERROR"
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uffd_plugin.h>

int main(void) {
  int ends[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ends) != 0) return perror("socketpair"), 1;
  // BrokerToPlugin{error: Error{code: ERROR_NOT_AUTHORIZED (3), message}}, encoded by hand.
  const char message[] = "uid 4242 may not serve as a plugin of this broker";
  uint8_t packet[128] = {0x12, (uint8_t)(4 + strlen(message)), 0x08, 3, 0x12, (uint8_t)strlen(message)};
  memcpy(packet + 6, message, strlen(message));
  if (send(ends[0], packet, 6 + strlen(message), 0) < 0 || shutdown(ends[0], SHUT_RDWR) != 0) return perror("refusing"), 1;
  // Whatever the plugin sends now fails: the path under test.
  printf("probe: %s\n", send(ends[1], "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE ? "EPIPE" : "sent");
  char fd[16];
  snprintf(fd, sizeof fd, "%d", ends[1]);
  setenv("UFFD_BROKER_PLUGIN_FD", fd, 1);
  uffd_plugin *plugin = uffd_plugin_connect(NULL, "refused");
  if (plugin) return puts("connected"), 1;
  printf("errno %d: %s\n", errno, uffd_plugin_last_error());
  return 0;
}
