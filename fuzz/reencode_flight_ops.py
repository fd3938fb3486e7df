"""Re-encodes `flight_ops` inputs (corpus and regressions) after variants were appended
to `tokenflight_tests::model::Op`, so each input decodes to the same scenario as before.

The derive picks an enum variant from a u32 tag `t` as `(t * count) >> 32`, so a new
variant moves every old one; payloads are unchanged, so only each `Op` tag is rewritten
(`OLD`, `NEW`: the variant counts before and after). Used for issue 26 (15 -> 18, with
`Op::IntoLeeway`, `Op::Stray`, `Op::UnlockHangs`); checked by decoding every input with
the old and the new model and comparing the `Debug` of the scenarios (all identical).
The payload layout below is the one of that change: update it with `Op`.

Usage: python3 fuzz/reencode_flight_ops.py fuzz/corpus/flight_ops/* fuzz/regressions/flight_ops/<name>
(rewrites the files in place).
"""
import sys, struct

OLD, NEW = 15, 18

class R:
    def __init__(self, d): self.d, self.i = d, 0
    def take(self, n):
        b = self.d[self.i:self.i+n]; self.i += len(b); return b
    def empty(self): return self.i >= len(self.d)
    def u32(self):
        b = self.take(4); return b, struct.unpack('<I', (b + b'\0'*4)[:4])[0]
    def u8(self):
        b = self.take(1); return b, (b[0] if b else 0)

def variant(t, n): return (t * n) >> 32

def tag(i, n):
    x = ((i << 32) // n) + 1
    assert (x * n) >> 32 == i
    return struct.pack('<I', x)

def copy_u32(r, out): b, v = r.u32(); out += b; return v
def copy_u8(r, out): b, v = r.u8(); out += b; return v
def copy_enum(r, out, n): return variant(copy_u32(r, out), n)

def lifetime(r, out):
    v = copy_enum(r, out, 3)
    if v == 0: copy_u32(r, out)
    elif v == 1: copy_u32(r, out); copy_u32(r, out)

def outcome(r, out):
    v = copy_enum(r, out, 4)
    if v == 0: lifetime(r, out)
    elif v == 1:
        if copy_u8(r, out) & 1: copy_u32(r, out)

def op(r, out):
    b, t = r.u32()
    v = variant(t, OLD)
    out += tag(v, NEW)
    if v == 0: copy_u8(r, out)            # Send
    elif v == 2: copy_u32(r, out)          # Reject(Which)
    elif v == 4: copy_u8(r, out)           # Poll
    elif v == 6: copy_u8(r, out); copy_u8(r, out)  # Respond
    elif v == 7: outcome(r, out)           # Source
    elif v == 8: copy_u8(r, out)           # Cancel
    elif v == 9: copy_u32(r, out)          # Advance(Step)
    elif v == 10: copy_u8(r, out); copy_u8(r, out)  # WallStep
    elif v == 13: copy_u8(r, out); copy_u32(r, out) # StoreFault
    elif v == 14: copy_u32(r, out)         # Push
    # Token 1, Force 3, Settle 5, Login 11, ReplicaLogin 12: no payload

def convert(d):
    r, out = R(d), bytearray()
    copy_u32(r, out)                       # Initial
    for _ in range(4): copy_u8(r, out)     # spawner, refresh_ahead, backoff, retries
    if copy_u8(r, out) & 1: copy_u32(r, out)  # stale
    copy_u8(r, out)                        # hook_panics
    while not r.empty():
        b, k = r.u8(); out += b
        if not (k & 1): break
        if r.empty():
            # Old: the op decodes from zeros (Send { replayable: false }); new: the same.
            break
        op(r, out)
    out += r.d[r.i:]                        # trailing bytes the decoder never read
    return bytes(out)

for path in sys.argv[1:]:
    d = open(path, 'rb').read()
    open(path, 'wb').write(convert(d))
