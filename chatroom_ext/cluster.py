"""One room across several server processes, through Redis (`server.py ... -redis URL`).

server.py's core hands every input to the room (Joining, Typed, Gone) to its
room log (`server.RoomLog`). RedisLog is that log: submit puts the input into
one Redis Stream, and a reader task hands every entry of that stream, in
stream order, back to the hub of every server (`Host.apply`), its own entries
included. Everything it asks of the server goes through the `Host` interface
below. Room.step is deterministic, so every
server holds the same members in the same join order, and a race for a name is
settled by the stream: the second Joining is turned away on its own server.

docs/CLUSTER.md is the user's guide: keys, guarantees and their limits. In
short, for the code below:

- Writes go through a local outbox, in order, in batches, each entry tagged
  (node, seq). One Lua script (SUBMIT) appends a batch to the stream and
  keeps the member registry in step with it atomically; it skips an entry
  whose seq it has already taken (a retry after a lost reply), so a replay
  never duplicates a line.
- The reader resumes from the last stream ID it applied. A server that starts
  reads a snapshot of the registry and the stream position it corresponds to
  in one script (CHECK), and reads on from there.
- While Redis is unreachable the server keeps its own room going on a copy of
  the room (the "view"): its members' lines are shown to its own clients at
  once and queued; when Redis is back they are written, and when they come
  back through the stream they change the real room without being shown a
  second time. New logins wait for Redis. Reconnects back off 0.1 s to 5 s.
- Liveness: every server refreshes a heartbeat key with a TTL; every server
  runs REAP, which, for a server whose key expired, announces each of its
  members as gone (in join order) and forgets them, atomically, so two
  reapers never announce one member twice.
- A server that was reaped but is alive (a long partition) re-registers its
  members when it reconnects (entries of kind 'R'), so they are announced as
  joined again rather than silently gone; one whose name was taken meanwhile
  is told so and disconnected.
- If Redis lost the room's data (the `epoch` key changed) or trimmed entries
  a server had not read, that server resynchronises from a snapshot.
- History (`-history N`): the log's public lines. Each server records those
  of every entry it applies, named by the entry's id, and at start or after a
  resync reads the log's tail backwards for them. An entry's lines are worked
  out from the entry alone (SUBMIT marks a Joining that lost its name), so
  every server keeps the same lines, ids and times.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

if TYPE_CHECKING:  # server.py runs as __main__: its types, for the checker only
    from server import History, Input, Output, Room

PREFIX = "chatroom:"  # every key the cluster uses starts with this
HEARTBEAT_TTL_MS = 6000  # a server whose heartbeat is this old is dead
HEARTBEAT_EVERY = 2.0  # seconds between heartbeats
REAP_EVERY = 1.0  # seconds between looks for dead servers
# After (re)connecting, a server waits this long before it declares others
# dead: after a Redis outage every server's heartbeat has expired, and each
# needs up to BACKOFF_MAX + CONNECT_TIMEOUT to come back and refresh it.
REAP_GRACE = 9.0
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0
READ_BLOCK_MS = 2000  # < SOCKET_TIMEOUT
READ_COUNT = 1000
BATCH = 256  # outbox entries per SUBMIT call
STREAM_MAXLEN = 100_000  # entries kept (approximately) in the stream
CLOSE_WAIT = 3.0  # seconds close() waits for the last entries to be written

# Statuses SUBMIT returns per entry.
WRITTEN, DUPLICATE, DROPPED, TAKEN = 1, 0, -1, -2

# The member registry: hash <key> -> "<join order> <node> <name>" (neither a
# node id nor a username holds whitespace), per-node sets of member keys, and
# the set of nodes that own members. Every change to it goes with the XADD
# of the entry that makes the same change to every server's Room.
_LUA_COMMON = """
local function owner(members, key)
  local v = redis.call('HGET', members, key)
  if v then return string.match(v, '^%d+ (%S+) ') end
  return nil
end
"""

SUBMIT = _LUA_COMMON + """
-- KEYS: epoch log members seqs order nodes owned
-- ARGV: epoch node maxlen, then per entry: seq kind key name x t
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('CHATROOM-EPOCH') end
local log, members, owned = KEYS[2], KEYS[3], KEYS[7]
local node, maxlen = ARGV[2], ARGV[3]
local last = tonumber(redis.call('HGET', KEYS[4], node) or '0')
local out = {}
local function add(...)
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', ...)
end
local function join(key, name)
  redis.call('HSET', members, key, redis.call('INCR', KEYS[5]) .. ' ' .. node .. ' ' .. name)
  redis.call('SADD', owned, key)
  redis.call('SADD', KEYS[6], node)
end
local function rejoin(key, name)
  join(key, name)
  add('k', 'J', 'u', name, 'x', node .. '!rejoin')
end
local function leave(key)
  redis.call('HDEL', members, key)
  redis.call('SREM', owned, key)
end
for i = 4, #ARGV, 6 do
  local seq, kind, key, name, x = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  local n = tonumber(seq)
  local status = 1
  if n > 0 and n <= last then
    status = 0
  else
    if n > 0 then last = n end
    local who = owner(members, key)
    if kind == 'J' then
      if not who then
        join(key, name)
        add('n', node, 's', seq, 'k', 'J', 'u', name, 'x', x)
      else  -- every server turns it away; r tells a reader of the log so
        add('n', node, 's', seq, 'k', 'J', 'u', name, 'x', x, 'r', '1')
      end
    elseif who and who ~= node then
      status = -2
    elseif kind == 'R' then
      if not who then rejoin(key, name) end
    elseif not who and (kind == 'G' or x == ':Exit') then
      status = -1
    else
      if not who then rejoin(key, name) end
      if kind == 'T' then
        add('n', node, 's', seq, 'k', 'T', 'u', name, 'x', x, 't', ARGV[i+5])
        if x == ':Exit' then leave(key) end
      else
        add('n', node, 's', seq, 'k', 'G', 'u', name)
        leave(key)
      end
    end
  end
  out[#out+1] = status
end
redis.call('HSET', KEYS[4], node, last)
return out
"""

REAP = _LUA_COMMON + """
-- KEYS: epoch log members seqs nodes; ARGV: epoch me maxlen prefix
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('CHATROOM-EPOCH') end
local gone = 0
for _, n in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  if n ~= ARGV[2] and redis.call('EXISTS', ARGV[4] .. 'node:' .. n) == 0 then
    local owned = ARGV[4] .. 'owned:' .. n
    local dead = {}
    for _, key in ipairs(redis.call('SMEMBERS', owned)) do
      local v = redis.call('HGET', KEYS[3], key)
      if v then
        local order, who, name = string.match(v, '^(%d+) (%S+) (.*)$')
        if who == n then dead[#dead+1] = {tonumber(order), key, name} end
      end
    end
    table.sort(dead, function(a, b) return a[1] < b[1] end)
    for _, m in ipairs(dead) do
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'k', 'G', 'u', m[3])
      redis.call('HDEL', KEYS[3], m[2])
      gone = gone + 1
    end
    redis.call('DEL', owned)
    redis.call('SREM', KEYS[5], n)
    redis.call('HDEL', KEYS[4], n)
  end
end
return gone
"""

CHECK = """
-- KEYS: epoch log members; ARGV: a fresh epoch, used if Redis has none
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local last, added, length, first = '0-0', false, 0, false
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    local f = info[i]
    if f == 'last-generated-id' then last = info[i+1]
    elseif f == 'entries-added' then added = tostring(info[i+1])
    elseif f == 'length' then length = info[i+1]
    elseif f == 'first-entry' and info[i+1] then first = info[i+1][1]
    end
  end
end
return {epoch, last, added, length, first, redis.call('HGETALL', KEYS[3])}
"""

BYE = """
-- KEYS: heartbeat owned nodes seqs; ARGV: node
redis.call('DEL', KEYS[1])
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
end
return 1
"""

Entry = tuple[str, str, str, str, str, str]  # seq kind key name x t: SUBMIT's ARGV


class EpochChanged(Exception):
    """Redis no longer holds the room this server knows (restarted empty)."""


def stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def new_node_id() -> str:
    """Unique per process, never reused; no '/', whitespace or ':'."""
    host = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:24] or "host"
    return f"{host}.{os.getpid()}.{secrets.token_hex(3)}"


def say(line: str) -> None:
    """One line on stderr, as server.py reports trouble."""
    try:
        sys.stderr.write(f"server.py: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Host(Protocol):
    """What the log asks of the server it serves (server.Hub)."""

    @property
    def room(self) -> Room: ...  # the room as this server holds it
    def apply(self, inp: Input) -> None: ...  # an input, in the room's order
    def show(self, outputs: Sequence[Output]) -> None: ...  # outputs of the log's own view
    def here(self, name: str) -> bool: ...  # a member connected to this server?
    def names_here(self) -> list[str]: ...
    def waiting(self, ticket: str) -> bool: ...  # a login of ours still waiting?
    def fail(self, name: str, code: str, text: str) -> None: ...
    def finish_exit(self, name: str) -> None: ...
    def refuse_member(self, name: str, code: str, text: str) -> None: ...
    def encode(self, inp: Input) -> tuple[str, str, str, str]: ...  # kind, name, extra, time
    def decode(self, kind: str, name: str, extra: str, when: str) -> Input: ...
    def key(self, name: str) -> str: ...  # the name as the room compares names
    def leaves(self, inp: Input) -> bool: ...  # a member's :Exit?
    @property
    def history(self) -> History | None: ...  # the room's last public lines, if kept (-history)
    def public_lines(self, inp: Input) -> list[str]: ...  # what it keeps of an input that counts


class RedisLog:
    """This server's link to the shared log: outbox, writer, reader,
    heartbeat. server.py builds it (`-redis URL`), gives it to the core as its
    room log, and starts it with the hub as its Host."""

    def __init__(self, url: str, backlog: int) -> None:
        """Exits with one line on stderr if `url` is not a Redis URL."""
        try:
            client = aioredis.from_url(
                url, decode_responses=True, protocol=2, socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT, retry=Retry(NoBackoff(), 0))
        except ValueError as exc:
            say(f"error: -redis {redact(url)}: {exc}")
            raise SystemExit(2) from None
        self.hub: Host | None = None  # set by start()
        self.backlog = backlog  # this server's lines that may wait for Redis (-redis-backlog)
        self.url = url
        self.r = client
        self.node = new_node_id()
        k = PREFIX
        self.k_epoch, self.k_log, self.k_members = k + "epoch", k + "log", k + "members"
        self.k_seqs, self.k_order, self.k_nodes = k + "seqs", k + "order", k + "nodes"
        self.k_beat, self.k_owned = f"{k}node:{self.node}", f"{k}owned:{self.node}"
        self.s_submit = client.register_script(SUBMIT)
        self.s_reap = client.register_script(REAP)
        self.s_check = client.register_script(CHECK)
        self.s_bye = client.register_script(BYE)
        self.epoch = ""  # the room's generation in Redis, once known
        self.last_id = "0-0"  # the last stream entry applied
        self.n_read = 0  # entries the stream had added up to last_id
        self.seq = 0
        self.outbox: deque[Entry] = deque()  # to write, in order
        self.unread: deque[Entry] = deque()  # written, not yet read back
        self.preapplied: set[int] = set()  # seqs already shown here (outage)
        self.seen: dict[str, int] = {}  # node -> last seq applied
        self.joins: dict[str, str] = {}  # ticket -> name: our logins in flight
        self.view: Room | None = None  # the room as shown here while Redis is away
        self.online = False
        self.since = 0.0  # when this connection to Redis began (loop time)
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None
        self.gen = 0  # the current session; older loops stop when it moves on
        self.history_stale = False  # the history must be read again from the log
        self.loop = asyncio.get_running_loop()

    @property
    def host(self) -> Host:
        assert self.hub is not None, "RedisLog.start(hub) comes first"
        return self.hub

    async def start(self, hub: Host) -> None:
        """Join the cluster: sync with Redis, then read and write in the
        background. Exits with one line on stderr if Redis cannot be reached."""
        self.hub = hub
        try:
            await asyncio.wait_for(self.sync(), 3 * SOCKET_TIMEOUT)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            say(f"error: cannot use Redis at {redact(self.url)}: {exc or type(exc).__name__}")
            try:
                await self.r.aclose()
            except (RedisError, OSError):
                pass
            raise SystemExit(1) from None
        self.task = self.loop.create_task(self.run())

    # -- inputs from this server ------------------------------------------------

    def submit(self, inp: Input) -> None:
        """The core's room log: queue `inp` for the stream (and, while Redis
        is away, show it here at once unless it is a login). A member's line
        is refused while `backlog` entries already wait (Redis away or slow),
        unless it is :Exit; logins and leaves are bounded by the connections."""
        host = self.host
        kind, name, x, t = host.encode(inp)
        if kind == "T" and len(self.outbox) >= self.backlog and not host.leaves(inp):
            host.fail(name, "backlog", "Too many lines wait for the room's log; "
                                       "this one was not sent")
            return
        if kind == "J":
            self.joins[x] = name
        self.seq += 1
        entry = (str(self.seq), kind, host.key(name), name, x, t)
        if not self.online and kind != "J":
            self._preapply(entry)
        self.outbox.append(entry)
        self.idle.clear()
        self.wake.set()

    def _queue(self, kind: str, name: str, x: str = "") -> None:
        """Queue an entry this module makes itself (rejoin 'R', seq 0: never
        deduplicated; or a Gone/Joining during a resync)."""
        if kind == "R":
            entry = ("0", "R", self.host.key(name), name, "", "")
        else:
            self.seq += 1
            entry = (str(self.seq), kind, self.host.key(name), name, x, "")
        self.outbox.append(entry)
        self.idle.clear()
        self.wake.set()

    def _preapply(self, entry: Entry) -> None:
        """Show a member's input on this server now, on the view."""
        seq, kind, _key, name, x, t = entry
        if kind not in ("T", "G") or int(seq) in self.preapplied:
            return
        if self.view is None:
            self.view = copy.deepcopy(self.host.room)
        self.preapplied.add(int(seq))
        self.host.show(self.view.step(self.host.decode(kind, name, x, t)))

    # -- the stream, read ----------------------------------------------------------

    def _on_entry(self, eid: str, f: dict[str, str]) -> None:
        self.last_id = eid
        self.n_read += 1
        kind, name = f.get("k", ""), f.get("u", "")
        if kind not in ("J", "T", "G") or not name:
            return  # not ours to read
        node, s = f.get("n", ""), int(f.get("s") or 0)
        if node and s:
            if s <= self.seen.get(node, 0):
                return  # a duplicate that slipped through
            self.seen[node] = s
        host = self.host
        x = f.get("x", "")
        inp = host.decode(kind, name, x, f.get("t", ""))
        if node == self.node:
            while self.unread and int(self.unread[0][0]) <= s:
                self.unread.popleft()
            if kind == "J":
                self.joins.pop(x, None)
            if s in self.preapplied:  # shown here during an outage
                self.preapplied.discard(s)
                host.room.step(inp)
                self._record(eid, f, inp)
                return
        host.apply(inp)
        self._record(eid, f, inp)
        if kind == "G" and not node and host.here(name):
            # Another server declared this server dead and its member gone;
            # it is here and well: put it back in the room.
            self._queue("R", name)

    # -- the history: the log's public lines ------------------------------------------

    def _public(self, eid: str, f: dict[str, str], inp: Input) -> list[tuple[str, float, str]]:
        """The public lines of entry `eid` as the history keeps them: (id,
        time, line), from the entry alone (every entry in the log takes effect
        but a Joining marked `r`), so every server keeps the same. The id is
        the entry's ("<ms>-<seq>"; a second line of one input adds ".1"); the
        time is when the line was typed (`t`), else when Redis took it."""
        if f.get("r"):
            return []
        lines = self.host.public_lines(inp)
        if not lines:
            return []
        when = float(f.get("t") or 0) or stream_id(eid)[0] / 1000
        return [(eid if i == 0 else f"{eid}.{i}", when, line) for i, line in enumerate(lines)]

    def _record(self, eid: str, f: dict[str, str], inp: Input) -> None:
        """Entry `eid` was applied: keep its public lines, if history is kept."""
        history = self.host.history
        if history is not None:
            for pid, when, line in self._public(eid, f, inp):
                history.record(line, when, pid)

    async def _load_history(self) -> None:
        """Fill the history from the log, up to the last entry applied: its
        newest public lines, read backwards a page at a time until there are
        enough, or the entries are older than the history keeps, or the log
        (trimmed to STREAM_MAXLEN) ends."""
        history = self.host.history
        if history is None:
            return
        found: list[tuple[str, dict[str, str], list[tuple[str, float, str]]]] = []
        count = 0
        oldest_ms = (time.time() - history.max_age) * 1000
        top, more = self.last_id, self.last_id != "0-0"
        while more and count < history.keep:
            reply: Any = await self.r.xrevrange(self.k_log, max=top, min="-", count=READ_COUNT)
            page: list[tuple[str, dict[str, str]]] = reply or []
            more = len(page) == READ_COUNT
            for eid, f in page:
                if stream_id(eid)[0] < oldest_ms:
                    more = False
                    break
                kind, name = f.get("k", ""), f.get("u", "")
                if kind in ("J", "T", "G") and name:
                    inp = self.host.decode(kind, name, f.get("x", ""), f.get("t", ""))
                    lines = self._public(eid, f, inp)
                    found.append((eid, f, lines))
                    count += len(lines)
            if more:  # the next page ends just before this one's oldest entry
                ms, seq = stream_id(page[-1][0])
                top = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2 ** 64 - 1}"
        history.clear()
        seen: dict[str, int] = {}
        for _eid, f, lines in reversed(found):
            node, s = f.get("n", ""), int(f.get("s") or 0)
            if node and s:  # a duplicate that slipped through counts once, as the reader does
                if s <= seen.get(node, 0):
                    continue
                seen[node] = s
            for pid, when, line in lines:
                history.record(line, when, pid)

    async def _reader(self, gen: int) -> None:
        while gen == self.gen:
            reply: Any = await self.r.xread({self.k_log: self.last_id}, count=READ_COUNT,
                                            block=READ_BLOCK_MS)
            if gen != self.gen:
                return  # a later session reads on from last_id
            for _stream, entries in reply or ():
                for eid, fields in entries:
                    self._on_entry(eid, fields)

    # -- the stream, written -------------------------------------------------------

    async def _writer(self, gen: int) -> None:
        keys = [self.k_epoch, self.k_log, self.k_members, self.k_seqs, self.k_order,
                self.k_nodes, self.k_owned]
        while gen == self.gen:
            if not self.outbox:
                self.idle.set()
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = list(islice(self.outbox, BATCH))
            if any(e[1] == "R" and not self.host.here(e[3]) for e in batch):
                # A rejoin for someone who has left here since: drop it.
                self.outbox = deque(e for e in self.outbox
                                    if e[1] != "R" or self.host.here(e[3]))
                continue
            args: list[str] = [self.epoch, self.node, str(STREAM_MAXLEN)]
            for entry in batch:
                args += entry
            statuses = await self._script(self.s_submit, keys, args)
            if gen != self.gen:
                return  # a later session writes the batch again (SUBMIT skips repeats)
            for entry, status in zip(batch, statuses, strict=True):
                self.outbox.popleft()
                self._written(entry, int(status))

    def _written(self, entry: Entry, status: int) -> None:
        seq = int(entry[0])
        if status in (WRITTEN, DUPLICATE):
            if seq > self.seen.get(self.node, 0):  # the reader can be first
                self.unread.append(entry)
            return
        shown = seq in self.preapplied
        self.preapplied.discard(seq)  # it will not come back
        kind, name = entry[1], entry[3]
        if status == DROPPED and kind == "T" and not shown and self.host.here(name):
            # :Exit from a member the others already saw leave (this server
            # was declared dead meanwhile): finish it here.
            self.host.finish_exit(name)
        elif status == TAKEN and kind in ("T", "R"):
            self.host.refuse_member(name, "name-taken", f"The username {name} was taken while "
                                                        "this server was cut off from the cluster")

    async def _script(self, script: Any, keys: list[str], args: list[str]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except ResponseError as exc:
            if "CHATROOM-EPOCH" in str(exc):
                raise EpochChanged from None
            raise

    # -- liveness ---------------------------------------------------------------

    async def _beat(self) -> None:
        await self.r.set(self.k_beat, "1", px=HEARTBEAT_TTL_MS)

    async def _ticker(self, gen: int) -> None:
        keys = [self.k_epoch, self.k_log, self.k_members, self.k_seqs, self.k_nodes]
        args = [self.epoch, self.node, str(STREAM_MAXLEN), PREFIX]
        next_beat = 0.0
        while gen == self.gen:
            now = self.loop.time()
            if now >= next_beat:
                await self._beat()
                next_beat = now + HEARTBEAT_EVERY
            if now - self.since >= REAP_GRACE:
                await self._script(self.s_reap, keys, args)
            await asyncio.sleep(REAP_EVERY)

    # -- connection life ----------------------------------------------------------

    async def sync(self) -> None:
        """Just connected: heartbeat, make sure this server's picture of the
        room still matches Redis (else resynchronise), put back any member of
        ours Redis forgot; from now on inputs go through the stream."""
        await self._beat()
        reply = await self.s_check(keys=[self.k_epoch, self.k_log, self.k_members],
                                   args=[secrets.token_hex(8)])
        epoch, last, added, length, first, flat = reply
        gap = False
        if added:  # Redis >= 7: entries-added tells exactly what was trimmed
            gap = self.n_read < int(added) - int(length)
        elif first and self.last_id != "0-0":
            gap = stream_id(first) > stream_id(self.last_id)
        if (epoch != self.epoch or gap or stream_id(last) < stream_id(self.last_id)):
            if self.epoch:
                say("Redis no longer holds what this server last read; resynchronising")
            self._resync(epoch, last, int(added or 0), flat)
            self.history_stale = True
        if self.history_stale:  # (also when the last try failed half-way)
            await self._load_history()
            self.history_stale = False
        for name in self.host.names_here():
            self._queue("R", name)
        self.online = True
        self.view = None
        self.since = self.loop.time()

    def _resync(self, epoch: str, last: str, added: int, flat: list[str]) -> None:
        """Start over from Redis's registry: the room as it is now, without
        notices (whatever happened in between is not known here)."""
        host = self.host
        room = host.room
        for name in room.names:
            room.step(host.decode("G", name, "", ""))
        found = []
        for i in range(0, len(flat), 2):
            order, node, name = flat[i + 1].split(" ", 2)
            found.append((int(order), node, name))
        found.sort()
        for _, node, name in found:
            room.step(host.decode("J", name, "", ""))
            if node == self.node and not host.here(name):
                self._queue("G", name)  # ours, but nobody holds it here
        self.epoch, self.last_id, self.n_read = epoch, last, added
        self.unread.clear()
        # Logins in flight: whatever became of their Joining, write it again
        # (after the Gone above if Redis already had it).
        self.outbox = deque(e for e in self.outbox if e[1] != "J")
        for ticket, name in list(self.joins.items()):
            if host.waiting(ticket):
                self._queue("J", name, ticket)
            else:
                del self.joins[ticket]
        self.preapplied &= {int(e[0]) for e in self.outbox}

    def _offline(self, why: BaseException) -> None:
        if self.online:
            reason = str(why) or type(why).__name__
            say(f"lost Redis at {redact(self.url)} ({reason}); this server's room "
                "goes on alone and catches up when Redis is back")
        self.online = False
        # What this server wrote but has not seen applied: show it here now,
        # in order, before anything typed from now on.
        done = self.seen.get(self.node, 0)
        for entry in (*self.unread, *self.outbox):
            if int(entry[0]) > done:
                self._preapply(entry)

    async def _session(self) -> None:
        """Read, write and beat until one of them fails. Each loop also stops
        at its next turn once `gen` moves on: a cancellation can be lost inside
        a Redis call (seen with redis-py 8 after the process was stopped), so
        the session does not wait for the tasks' end for more than a moment."""
        self.gen += 1
        gen = self.gen
        tasks = [self.loop.create_task(c(gen)) for c in (self._reader, self._writer, self._ticker)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():  # not by us: something inside gave up
                    raise ConnectionError("a Redis call was cancelled")
                task.result()
            raise ConnectionError("a cluster task ended")  # they never return
        finally:
            self.gen += 1
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)
            try:  # start the next session on fresh connections
                await asyncio.wait_for(self.r.connection_pool.disconnect(), 1.0)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        synced = True  # start() synced the first time
        while True:
            try:
                if not synced:
                    await self.sync()
                    say(f"Redis is back at {redact(self.url)}")
                synced = False
                backoff = BACKOFF_FIRST
                await self._session()
            except EpochChanged:
                self._offline(EpochChanged("the room's data in Redis changed"))
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                self._offline(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:  # a bug: say it in one line, keep trying
                say(f"cluster: {type(exc).__name__}: {exc}")
                self._offline(exc)
                await asyncio.sleep(BACKOFF_MAX)

    async def close(self) -> None:
        """After hub.shutdown(): wait (bounded) until its Gone entries are
        written, then stop and take this server out of the cluster."""
        if self.online:
            try:
                await asyncio.wait_for(self.idle.wait(), CLOSE_WAIT)
            except asyncio.TimeoutError:
                pass
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.online:
            try:
                await asyncio.wait_for(
                    self.s_bye(keys=[self.k_beat, self.k_owned, self.k_nodes, self.k_seqs],
                               args=[self.node]), 1.0)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass  # the others declare this server dead when its heartbeat ends
        try:
            await self.r.aclose()
        except (RedisError, OSError):
            pass
