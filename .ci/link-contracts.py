import re, glob
files = glob.glob('core/src/**/*.rs', recursive=True) + glob.glob('adapters/*/src/**/*.rs', recursive=True)
total=0
for p in files:
    core = '/core/' in p
    target = 'crate' if core else 'tokenflight'
    lines = open(p).read().split('\n')
    changed = False
    for i, line in enumerate(lines):
        st = line.lstrip()
        if not (st.startswith('///') or st.startswith('//!')):
            continue
        if '<a id="c' in line or '```' in st:
            continue
        new = re.sub(r'(?<![\[\w#–-])C(\d{1,2})\b(?!\]|–|\(|-)', lambda m: f'[C{m.group(1)}]({target}#c{m.group(1)})', line)
        if new != line:
            lines[i] = new; changed = True; total += 1
    if changed:
        open(p, 'w').write('\n'.join(lines))
print(total)
