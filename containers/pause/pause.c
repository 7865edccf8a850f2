/* The test node's pod sandbox process (containerd sandbox_image stratus.local/pause:1): sleeps until SIGINT/SIGTERM,
 * reaps children. Built static by containers/build.ts (gcc -Os -static). From ../shared/reference/kubelet.md §2. */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static void sigdown(int s) {
  (void)s;
  _exit(0);
}

static void sigreap(int s) {
  (void)s;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && argv[1][0] == '-' && argv[1][1] == 'v') {
    printf("pause.c stratus\n");
    return 0;
  }
  struct sigaction sa = {0};
  sa.sa_handler = sigdown;
  if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) return 1;
  struct sigaction sr = {0};
  sr.sa_handler = sigreap;
  sr.sa_flags = SA_NOCLDSTOP;
  if (sigaction(SIGCHLD, &sr, NULL) < 0) return 3;
  for (;;) pause();
}
