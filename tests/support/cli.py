"""What the command-line tests share: one command's result."""


class Run:
    """A CLI ``main()``'s exit status and what it wrote to standard output and error."""

    def __init__(self, status, out, err):
        self.status, self.out, self.err = status, out, err

    @property
    def lines(self):
        return self.out.splitlines()
