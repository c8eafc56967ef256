"""An ordinary third-party SMTP server for the tests and the benchmark: aiosmtpd,
configured only through its own options (no socket tuning of ours).

    python3 aiosmtpd_server.py --port N [--tls none|starttls|tls --cert C --key K]
                               [--auth USER:PASSWORD] [--record FILE [--record-content]]
                               [--reject ADDRESS ...]

Prints "ready" on stdout once it listens, then "accepted N" (messages accepted so far)
every 100 ms while the count changes. With --record, also appends one JSON line per
accepted message: {"mail_from", "rcpt_tos", "tls", "auth", "size"}, and "content" (the
message as text) with --record-content. Each --reject ADDRESS is refused at RCPT TO the
way Postfix words it, quoting the address: "550 5.1.1 <ADDRESS>: Recipient address
rejected: User unknown in local recipient table". It stops when its standard input
closes.
"""

import argparse
import json
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, record, content):
        self.record = record
        self.content = content
        self.accepted = 0

    async def handle_DATA(self, server, session, envelope):
        self.accepted += 1
        if self.record:
            line = {
                "mail_from": envelope.mail_from,
                "rcpt_tos": envelope.rcpt_tos,
                "tls": session.ssl is not None
                or server.transport.get_extra_info("ssl_object") is not None,
                "auth": session.authenticated,
                "size": len(envelope.content or b""),
            }
            if self.content:
                line["content"] = (envelope.content or b"").decode("utf-8", "replace")
            with open(self.record, "a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")
        return "250 OK"


class Rejecting(Handler):
    """A Handler that refuses some recipients (only used with --reject, so the plain
    server keeps aiosmtpd's own RCPT handling)."""

    def __init__(self, record, content, reject):
        super().__init__(record, content)
        self.reject = {address.lower() for address in reject}

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.reject:
            return (
                f"550 5.1.1 <{address}>: Recipient address rejected: "
                "User unknown in local recipient table"
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", choices=["none", "starttls", "tls"], default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--auth")
    parser.add_argument("--record")
    parser.add_argument("--record-content", action="store_true")
    parser.add_argument("--reject", action="append", default=[])
    args = parser.parse_args()

    context = None
    if args.tls != "none":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    kwargs = {}
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == user
                and auth_data.password.decode() == password
            )
            return AuthResult(success=ok)

        kwargs["authenticator"] = authenticator
        kwargs["auth_require_tls"] = args.tls != "none"
    if args.tls == "starttls":
        kwargs["tls_context"] = context
        kwargs["require_starttls"] = True
    elif args.tls == "tls":
        kwargs["ssl_context"] = context

    if args.reject:
        handler = Rejecting(args.record, args.record_content, args.reject)
    else:
        handler = Handler(args.record, args.record_content)
    controller = Controller(
        handler, hostname="127.0.0.1", port=args.port, **kwargs
    )
    handler = controller.handler
    controller.start()
    print("ready", flush=True)

    def report():
        last = -1
        while not stopped.is_set():
            if handler.accepted != last:
                last = handler.accepted
                try:
                    print(f"accepted {last}", flush=True)
                except (BrokenPipeError, OSError):
                    return  # nobody reads the count any more
            stopped.wait(0.1)

    stopped = threading.Event()
    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        sys.stdin.read()  # until the parent closes our stdin or kills us
    finally:
        stopped.set()
        controller.stop()


if __name__ == "__main__":
    main()
