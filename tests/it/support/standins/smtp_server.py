"""A real SMTP server for keywatch's tests: aiosmtpd (Debian's python3-aiosmtpd), optionally
with STARTTLS required and AUTH (LOGIN/PLAIN) checked. Every message it accepts is written to
OUT_DIR as a JSON file: {"mail_from", "rcpt_tos", "from", "to", "subject",
"message_id", "content_type" (of the message: multipart/alternative for keywatch's HTML
mail), "body" (the decoded text/plain part), "data" (raw)}. Prints "READY" when it listens.

Usage: /usr/bin/python3 smtp_server.py PORT OUT_DIR [--tls CERT KEY | --implicit-tls CERT KEY]
           [--auth USER PASSFILE]
(--tls: STARTTLS required; --implicit-tls: TLS from the first byte, like port 465.)
"""
import email
import email.policy
import json
import os
import ssl
import sys
import time
import uuid

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def text_of(msg):
    """The text/plain body, also of a multipart message."""
    part = msg.get_body(preferencelist=("plain",))
    return part.get_content() if part is not None else ""


class Store:
    def __init__(self, out):
        self.out = out

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        name = os.path.join(self.out, "%d-%s.json" % (time.time_ns(), uuid.uuid4().hex))
        with open(name + ".tmp", "w") as f:
            json.dump({"mail_from": envelope.mail_from,
                       "rcpt_tos": envelope.rcpt_tos,
                       "from": str(msg["From"]),
                       "to": str(msg["To"]),
                       "subject": str(msg["Subject"]),
                       "message_id": str(msg["Message-ID"]),
                       "content_type": msg.get_content_type(),
                       "body": text_of(msg),
                       "data": raw.decode("utf-8", "replace")}, f)
        os.rename(name + ".tmp", name)
        return "250 Message accepted for delivery"


def main():
    args = sys.argv[1:]
    port, out = int(args[0]), args[1]
    kwargs = {}
    controller_kwargs = {}
    if "--tls" in args:
        i = args.index("--tls")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args[i + 1], args[i + 2])
        kwargs["tls_context"] = ctx
        kwargs["require_starttls"] = True
    if "--implicit-tls" in args:
        i = args.index("--implicit-tls")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args[i + 1], args[i + 2])
        controller_kwargs["ssl_context"] = ctx
    if "--auth" in args:
        i = args.index("--auth")
        user = args[i + 1].encode()
        with open(args[i + 2], "rb") as f:
            password = f.read().strip()

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword)
                  and auth_data.login == user and auth_data.password == password)
            # handled=False: aiosmtpd answers 535 itself.
            return AuthResult(success=ok, handled=False)

        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
        kwargs["auth_require_tls"] = "--tls" in args or "--implicit-tls" in args
    controller = Controller(Store(out), hostname="127.0.0.1", port=port,
                            server_hostname="localhost", **controller_kwargs, **kwargs)
    controller.start()
    print("READY", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
