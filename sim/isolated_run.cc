#include "sim/isolated_run.h"

#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace synod::sim {

SimResult RunIsolated(const SimOptions& options) {
  SimResult result;
  int fds[2];
  if (pipe(fds) != 0) {
    result.failure = "pipe() failed";
    return result;
  }
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    result.failure = "fork() failed";
    return result;
  }
  if (pid == 0) {
    close(fds[0]);
    SimResult r = RunSimulation(options);
    std::string report = absl::StrCat(r.passed ? 1 : 0, " ", r.simulated_ms, " ",
                                      r.needless_elections, " ", r.failure);
    size_t sent = 0;
    while (sent < report.size()) {
      ssize_t n = write(fds[1], report.data() + sent, report.size() - sent);
      if (n <= 0) _exit(3);
      sent += static_cast<size_t>(n);
    }
    _exit(0);
  }
  close(fds[1]);
  std::string report;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) report.append(buf, n);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  size_t first = report.find(' ');
  size_t second = first == std::string::npos ? first : report.find(' ', first + 1);
  size_t third = second == std::string::npos ? second : report.find(' ', second + 1);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || third == std::string::npos) {
    result.failure = WIFSIGNALED(status)
                         ? absl::StrCat("the process died (signal ", WTERMSIG(status),
                                        "): replay the seed to see the check that failed")
                         : "the process died: replay the seed to see why";
    return result;
  }
  result.passed = report[0] == '1';
  (void)absl::SimpleAtoi(report.substr(first + 1, second - first - 1), &result.simulated_ms);
  (void)absl::SimpleAtoi(report.substr(second + 1, third - second - 1), &result.needless_elections);
  result.failure = report.substr(third + 1);
  return result;
}

}  // namespace synod::sim
