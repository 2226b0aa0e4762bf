"""The program runner that executes inside the sandbox (`python -I -c <this source>`); stdlib only.

Standard input starts with a request: a decimal length, a newline, then that many bytes of JSON (`nonce`, `code`,
`assertion`, `limits`, `drop_to`); the test's own input follows and is what the program reads. The runner sets the
resource limits, drops privileges when asked, runs the program (and the assertion, if any) as `__main__`, and
writes one report line to stderr: a newline, the nonce, then JSON with a `status`. Anything the program prints
itself carries no nonce, so it cannot pass for a report by accident.
"""

import ast
import json
import linecache
import os
import resource
import sys
import traceback
import types

PROGRAM_FILENAME = "solution.py"
TEST_FILENAME = "<test>"
MAX_REPR_CHARS = 1000


def read_request():
    """Read the request header from fd 0 and leave the file offset at the start of the test's input."""
    head = os.pread(0, 32, 0)
    length_text = head.split(b"\n", 1)[0]
    start = len(length_text) + 1
    length = int(length_text)
    os.lseek(0, start + length, os.SEEK_SET)
    return json.loads(os.pread(0, length, start))


def apply_limits(limits):
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def remember_source(filename, source):
    """Let tracebacks quote the lines of code that never existed as a file."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def user_traceback(error):
    """The traceback from the first frame of the program or test on, without this runner's frames."""
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename not in (PROGRAM_FILENAME, TEST_FILENAME):
        frames = frames.tb_next
    return "".join(traceback.format_exception(type(error), error, frames))


def raised_in_test(error):
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename == TEST_FILENAME


def safe_repr(value):
    try:
        text = repr(value)
    except Exception as error:  # a hostile __repr__ must not break the report
        text = f"<repr failed: {type(error).__name__}>"
    return text[:MAX_REPR_CHARS]


def guarded(action):
    """Run `action`; None when it ended normally (exit status 0 included), else the failure as a report dict."""
    try:
        action()
    except SystemExit as exit_request:
        code = exit_request.code
        if code is None or code == 0:
            return None
        return {"status": "exit", "code": code if isinstance(code, int) else 1, "message": safe_repr(code)}
    except MemoryError:
        return {"status": "memory"}
    except AssertionError as error:
        if raised_in_test(error):
            return {"status": "failed", "traceback": user_traceback(error)}
        return {"status": "error", "traceback": user_traceback(error)}
    except BaseException as error:
        return {"status": "error", "traceback": user_traceback(error)}
    return None


def check_assertion(statement, namespace):
    """Run one test statement. `assert A == B` is checked as such so a failure can show both sides."""
    remember_source(TEST_FILENAME, statement)
    tree = ast.parse(statement, TEST_FILENAME)
    node = tree.body[0] if len(tree.body) == 1 else None
    comparison = node.test if isinstance(node, ast.Assert) else None
    if not (isinstance(comparison, ast.Compare) and len(comparison.ops) == 1 and isinstance(comparison.ops[0], ast.Eq)):
        return guarded(lambda: exec(compile(tree, TEST_FILENAME, "exec"), namespace))
    sides = {}

    def evaluate():
        for name, expression in (("actual", comparison.left), ("expected", comparison.comparators[0])):
            sides[name] = eval(compile(ast.Expression(expression), TEST_FILENAME, "eval"), namespace)
        sides["equal"] = bool(sides["actual"] == sides["expected"])

    failure = guarded(evaluate)
    if failure is not None or sides["equal"]:
        return failure
    return {"status": "failed", "actual": safe_repr(sides["actual"]), "expected": safe_repr(sides["expected"])}


def write_report(nonce, report):
    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced its stdout
            pass
    data = b"\n" + nonce.encode() + json.dumps(report).encode() + b"\n"
    while data:
        data = data[os.write(2, data) :]
    os._exit(0)


def main():
    request = read_request()
    nonce = request["nonce"]
    apply_limits(request["limits"])
    if request["drop_to"] is not None:
        drop_privileges(*request["drop_to"])
    code = request["code"]
    remember_source(PROGRAM_FILENAME, code)
    try:
        program = compile(code, PROGRAM_FILENAME, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        line = getattr(error, "lineno", None)
        text = (getattr(error, "text", None) or "").rstrip()
        write_report(
            nonce, {"status": "syntax_error", "line": line, "message": getattr(error, "msg", str(error)), "text": text}
        )
    module = types.ModuleType("__main__")
    module.__file__ = PROGRAM_FILENAME
    sys.modules["__main__"] = module
    sys.argv = [PROGRAM_FILENAME]
    failure = guarded(lambda: exec(program, module.__dict__))
    if failure is None and request["assertion"] is not None:
        failure = check_assertion(request["assertion"], module.__dict__)
    if failure is not None and failure["status"] == "memory":
        module.__dict__.clear()  # free the program's data so that the report can still be written
    write_report(nonce, failure or {"status": "ok"})


if __name__ == "__main__":  # imported by the parent only for its constants
    main()
