/*
 * The sandbox ("pause") process of the test pods (scripts/node-runtime.sh builds it with
 * `gcc -static`). As PID 1 of the pod's PID namespace it must exit on SIGTERM/SIGINT (PID 1
 * has no default signal actions, so without handlers StopPodSandbox would wait for its
 * timeout and SIGKILL) and reap orphans re-parented to it. busybox cannot do both: its
 * `sleep` as PID 1 ignores SIGTERM and never reaps.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  int saved = errno;
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

static int on(int sig, void (*handler)(int)) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = handler;
  action.sa_flags = SA_RESTART | (sig == SIGCHLD ? SA_NOCLDSTOP : 0);
  sigemptyset(&action.sa_mask);
  return sigaction(sig, &action, NULL);
}

int main(void) {
  if (on(SIGINT, stop) || on(SIGTERM, stop) || on(SIGCHLD, reap)) {
    perror("pause: sigaction");
    return 1;
  }
  for (;;) {
    pause();
  }
}
