"""amqtt plugins that make the embedded broker enforce what Mosquitto's config does: logins from
the Mosquitto password file, and the federation's access policy (``fedprune.aggregator.access``).

amqtt 0.12.1 asks every auth plugin on CONNECT (all must agree) and every topic plugin on
SUBSCRIBE (a refusal answers 0x80 in the SUBACK), on PUBLISH (a refused message is dropped
silently, as Mosquitto does) and before delivering to each subscriber. It does not check the
topic of a last will, so :class:`LoginCheck` refuses a client whose will it may not write.

amqtt asks the auth plugins only after it has acted on the CONNECT's client id (deleted that
client's session and subscriptions, disconnected it): so the embedded broker runs
:class:`LoginCheck` itself on each CONNECT before amqtt sees it (``fedprune.aggregator.
embedded_broker``), and :class:`PasswordFileAuth` checks again inside amqtt.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from fedprune.aggregator.access import Access, AccessPolicy
from fedprune.aggregator.passwords import read_password_file, verify_password

_ACCESS = {Action.SUBSCRIBE: Access.READ, Action.RECEIVE: Access.READ, Action.PUBLISH: Access.WRITE}


class LoginCheck:
    """Logins checked against a Mosquitto password file (read once), and last wills against the
    federation's policy."""

    def __init__(self, password_file: str, federation: str, aggregator_user: str) -> None:
        self._users = read_password_file(password_file)
        self._policy = AccessPolicy(federation, aggregator_user)

    def refusal(self, username: str | None, password: str | None, will_topic: str | None) -> str | None:
        """Why this login is refused (for the log), or None if it is allowed. ``will_topic``:
        None when the CONNECT has no last will."""
        stored = self._users.get(username) if username else None
        if stored is None or not verify_password(stored, password or ""):
            return f"refused login of {username!r}: unknown user or wrong password"
        if will_topic is not None and not self._policy.allows(username, will_topic, Access.WRITE):
            return f"refused {username!r}: its last will is on {will_topic!r}, which it may not write"
        return None


class PasswordFileAuth(BaseAuthPlugin):
    """:class:`LoginCheck` as an amqtt auth plugin."""

    @dataclass
    class Config:
        password_file: str
        federation: str
        aggregator_user: str

    def __init__(self, context) -> None:
        super().__init__(context)
        cfg = self.context.config
        self._check = LoginCheck(cfg.password_file, cfg.federation, cfg.aggregator_user)

    async def authenticate(self, *, session) -> bool:
        refusal = self._check.refusal(session.username, session.password,
                                      (session.will_topic or "") if session.will_flag else None)
        if refusal is not None:
            self.context.logger.warning("%s (client %r)", refusal, session.client_id)
        return refusal is None


class FederationTopicAccess(BaseTopicPlugin):
    """Subscribe, publish and delivery checked against the federation's :class:`AccessPolicy`."""

    @dataclass
    class Config:
        federation: str
        aggregator_user: str

    def __init__(self, context) -> None:
        super().__init__(context)
        self._policy = AccessPolicy(self.context.config.federation, self.context.config.aggregator_user)

    async def topic_filtering(self, *, session=None, topic: str | None = None, action: Action | None = None) -> bool:
        access = _ACCESS.get(action)
        user = session.username if session is not None else None
        allowed = access is not None and topic is not None and self._policy.allows(user, topic, access)
        if not allowed and action != Action.RECEIVE:
            self.context.logger.warning("denied %s of %r to %r", action, topic, user)
        return allowed
