"""Backoff arithmetic (pure), then real processes: launch in a session under limits, logs, exits as
events, restarts on a task.Clock, stop with TERM then KILL after the grace."""
import os
import sys

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.server.deployment.test_engine import until

from dsmt.server.deployment.descriptor import Command, Limits, RestartPolicy, StopSpec
from dsmt.server.deployment.supervisor import (
    STABLE_SECONDS, Backoff, ProcessError, Supervisor, inside_home, prepare, process_alive, run_once,
)


def test_backoff_doubles_caps_and_gives_up():
    backoff = Backoff(RestartPolicy(max_restarts=5, backoff_initial=1, backoff_max=5))
    backoff.started(0)
    assert [backoff.after_exit(1) for _ in range(6)] == [1, 2, 4, 5, 5, None]
    assert backoff.restarts == 5


def test_backoff_forgives_a_process_that_stayed_up():
    backoff = Backoff(RestartPolicy(2, 1, 60), restarts=2)
    backoff.started(100)
    assert backoff.after_exit(100 + STABLE_SECONDS - 1) is None
    backoff.started(100)
    assert backoff.after_exit(100 + STABLE_SECONDS) == 1


class Listener:
    def __init__(self):
        self.exits, self.restarts, self.waiting = [], [], []

    def process_exited(self, name, reason, delay, restarts):
        self.exits.append((name, reason, delay, restarts))
        self._wake()

    def process_restarted(self, name, pid, started):
        self.restarts.append(pid)
        self._wake()

    def _wake(self):
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def next(self):
        d = defer.Deferred()
        self.waiting.append(d)
        return d


class ProcessTests(unittest.TestCase):
    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.clock = task.Clock()
        self.listener = Listener()
        self.supervisor = Supervisor(reactor, self.listener, clock=self.clock)
        self.log = os.path.join(self.home, "logs", "app.log")

    def launch(self, code, name="app", **kwargs):
        return prepare(self.home, "xyz1", name, Command((sys.executable, "-c", code), **kwargs), {"v": "42"})

    @defer.inlineCallbacks
    def test_one_shot_runs_in_its_session_with_limits_env_and_log(self):
        code = ("import os, resource; print(os.getsid(0) == os.getpid(), resource.getrlimit(resource.RLIMIT_NOFILE),"
                " os.environ['HOME'] == os.getcwd(), os.environ['USER'], os.environ['X'])")
        launch = self.launch(code, env=(("X", "${v}"),), limits=Limits(open_files=64))
        status = yield run_once(reactor, reactor, launch, 10)
        self.assertTrue(status.ok)
        self.assertEqual(open(os.path.join(self.home, "logs/app.log")).read(), "True (64, 64) True xyz1 42\n")

    @defer.inlineCallbacks
    def test_launch_failures_and_timeouts_are_precise(self):
        missing = prepare(self.home, "xyz1", "app", Command(("no-such-program-here",)), {})
        with self.assertRaises(ProcessError) as caught:
            yield run_once(reactor, reactor, missing, 10)
        self.assertEqual(caught.exception.code, "launch")
        self.assertIn("No such file", caught.exception.reason)
        with self.assertRaises(ProcessError) as caught:
            yield run_once(reactor, reactor, self.launch("import time; time.sleep(30)"), 0.2)
        self.assertEqual(caught.exception.code, "timeout")
        with self.assertRaises(ProcessError) as caught:
            prepare(self.home, "xyz1", "app", Command(("x",), env=(("HOME", "/"),)), {})
        self.assertEqual(caught.exception.code, "launch")

    def test_paths_cannot_leave_the_home(self):
        os.symlink("/", os.path.join(self.home, "escape"))
        with self.assertRaises(ProcessError) as caught:
            inside_home(self.home, "escape/etc")
        self.assertEqual(caught.exception.code, "path-escape")
        with self.assertRaises(ProcessError):
            prepare(self.home, "xyz1", "app", Command(("x",), cwd="escape"), {})

    @defer.inlineCallbacks
    def test_crashing_process_is_restarted_then_given_up(self):
        launch = self.launch("import sys; sys.exit(3)")
        exited = self.listener.next()
        yield self.supervisor.start(launch, RestartPolicy(1, 2, 60))
        yield exited
        self.assertEqual(self.listener.exits, [("app", "exited with status 3", 2, 1)])
        self.clock.advance(1.5)
        self.assertEqual(self.listener.restarts, [])
        restarted = self.listener.next()
        self.clock.advance(0.5)
        yield restarted
        exited = self.listener.next()
        yield exited
        self.assertEqual(self.listener.exits[-1], ("app", "exited with status 3", None, 1))
        self.assertFalse(self.supervisor.is_up("app"))

    @defer.inlineCallbacks
    def test_stop_sends_term_then_kill_after_grace(self):
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
        pid = yield self.supervisor.start(self.launch(code), RestartPolicy(5, 1, 60), StopSpec("TERM", 3))
        started = self.supervisor.started("app")
        self.assertTrue(process_alive(pid, started))
        yield until(lambda: os.path.exists(self.log) and open(self.log).read() == "up\n")   # TERM now ignored
        stopping = self.supervisor.stop("app")
        self.assertFalse(stopping.called)
        self.clock.advance(3)       # grace over: SIGKILL
        status = yield stopping
        self.assertEqual(str(status), "killed by signal 9 (SIGKILL)")
        self.assertEqual(self.listener.exits, [])       # a requested stop is not a crash
        self.assertFalse(process_alive(pid, started))
