"""An SMTP server for the tests (aiosmtpd) that keeps every mail it accepts.

Each accepted mail is written to DIR as NNNNNNNN.eml (the data, as received)
and NNNNNNNN.json (envelope sender, recipients, the port, whether the session
was TLS, who logged in).  DIR/control.json, read at every RCPT and DATA,
makes it answer otherwise:

    {"rcpt": "550 5.1.1 no such user", "data": "451 4.3.0 try again", "times": 2}

answers the next 2 MAIL, RCPT (or DATA) commands with that reply ("times": -1:
always); the file is rewritten as replies are used up.

Usage: smtp_sink.py DIR PORT [STARTTLS_PORT IMPLICIT_TLS_PORT CERT KEY USER PASSWORD]
  PORT               plain SMTP, no login
  STARTTLS_PORT      STARTTLS required, then AUTH (USER/PASSWORD) required
  IMPLICIT_TLS_PORT  TLS from the first byte (SMTPS), AUTH required
Runs until SIGTERM.  Run it with /usr/bin/python3 (Debian's aiosmtpd).
"""

import json
import os
import signal
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Sink:
    def __init__(self, directory):
        self.dir = directory
        self.lock = threading.Lock()
        self.count = len([f for f in os.listdir(directory) if f.endswith(".eml")])

    def _control(self, stage):
        """The reply control.json asks for at this stage, or None."""
        path = os.path.join(self.dir, "control.json")
        with self.lock:
            try:
                with open(path) as f:
                    c = json.load(f)
            except (OSError, ValueError):
                return None
            reply = c.get(stage)
            if not reply:
                return None
            times = int(c.get("times", 1))
            if times > 0:
                times -= 1
                if times == 0:
                    c.pop(stage, None)
                c["times"] = times
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(c, f)
                os.rename(tmp, path)
            return reply

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = self._control("mail")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self._control("rcpt")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        reply = self._control("data")
        if reply:
            return reply
        with self.lock:
            self.count += 1
            name = os.path.join(self.dir, "%08d" % self.count)
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                "port": server.transport.get_extra_info("sockname")[1] if server.transport else None,
                "tls": bool(server.transport and server.transport.get_extra_info("ssl_object")),
                "login": getattr(session, "sbw_login", None)}
        with open(name + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        with open(name + ".json", "w") as f:
            json.dump(meta, f)
        os.rename(name + ".eml.tmp", name + ".eml")
        return "250 2.0.0 Message accepted for delivery"


def authenticator(user, password):
    def check(server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user
              and auth_data.password.decode() == password)
        if ok:
            session.sbw_login = user
        return AuthResult(success=ok, handled=False)
    return check


def main(argv):
    directory, port = argv[1], int(argv[2])
    os.makedirs(directory, exist_ok=True)
    sink = Sink(directory)
    controllers = [Controller(sink, hostname="127.0.0.1", port=port)]
    if len(argv) > 3:
        tls_port, implicit_port, cert, key, user, password = argv[3:9]
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        auth = authenticator(user, password)
        controllers.append(Controller(sink, hostname="127.0.0.1", port=int(tls_port),
                                      tls_context=ctx, require_starttls=True,
                                      authenticator=auth, auth_required=True))
        controllers.append(Controller(sink, hostname="127.0.0.1", port=int(implicit_port),
                                      ssl_context=ctx, server_hostname="localhost",
                                      authenticator=auth, auth_required=True,
                                      auth_require_tls=False))
    for c in controllers:
        c.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    print("ready", flush=True)
    stop.wait()
    for c in controllers:
        c.stop()


if __name__ == "__main__":
    main(sys.argv)
