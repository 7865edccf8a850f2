/* The sandbox ("pause") process of the test node's pods: sleeps, reaps zombies, exits on SIGINT/SIGTERM.
   Built static by e2e/node/testimages.ts (kubelet.md §2). */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
static void sigdown(int s) { (void)s; _exit(0); }
static void sigreap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(int argc, char **argv) {
  if (argc > 1 && argv[1][0] == '-' && argv[1][1] == 'v') { printf("pause.c stratus\n"); return 0; }
  struct sigaction sa = {0}; sa.sa_handler = sigdown;
  if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) return 1;
  struct sigaction sr = {0}; sr.sa_handler = sigreap; sr.sa_flags = SA_NOCLDSTOP;
  if (sigaction(SIGCHLD, &sr, NULL) < 0) return 3;
  for (;;) pause();
}
