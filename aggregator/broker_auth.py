"""amqtt plugins that make the embedded broker enforce what Mosquitto's config does: logins from
the Mosquitto password file, and the federation's access policy (``fedprune.aggregator.access``).

amqtt 0.12.1 asks every auth plugin on CONNECT (all must agree) and every topic plugin on
SUBSCRIBE (a refusal answers 0x80 in the SUBACK), on PUBLISH (a refused message is dropped
silently, as Mosquitto does) and before delivering to each subscriber. It does not check the
topic of a last will, so :class:`PasswordFileAuth` refuses a client whose will it may not write.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from fedprune.aggregator.access import Access, AccessPolicy
from fedprune.aggregator.passwords import read_password_file, verify_password

_ACCESS = {Action.SUBSCRIBE: Access.READ, Action.RECEIVE: Access.READ, Action.PUBLISH: Access.WRITE}


class PasswordFileAuth(BaseAuthPlugin):
    """Logins checked against a Mosquitto password file (read once, at broker start)."""

    @dataclass
    class Config:
        password_file: str
        federation: str
        aggregator_user: str

    def __init__(self, context) -> None:
        super().__init__(context)
        cfg = self.context.config
        self._users = read_password_file(cfg.password_file)
        self._policy = AccessPolicy(cfg.federation, cfg.aggregator_user)

    async def authenticate(self, *, session) -> bool:
        user = session.username
        stored = self._users.get(user) if user else None
        if stored is None or not verify_password(stored, session.password or ""):
            self.context.logger.warning("refused login of %r from client %r: unknown user or wrong password",
                                        user, session.client_id)
            return False
        if session.will_flag and not self._policy.allows(user, session.will_topic or "", Access.WRITE):
            self.context.logger.warning("refused %r: its last will is on %r, which it may not write",
                                        user, session.will_topic)
            return False
        return True


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
