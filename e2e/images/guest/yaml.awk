# Flattens the small YAML subset that cloud-init seeds use into `path=value` lines, for the guest's /init.
#   a: {b: 1}          ->  a.b=1
#   a:\n  - x\n  - y   ->  a.0=x  a.1=y       (sequences may also sit at their key's indent)
#   a: [x, "y"]        ->  a.0=x  a.1=y
#   - to: t\n  via: v  ->  N.to=t N.via=v     (mappings inside sequence items)
# Quotes around scalars are removed; `#` comments, document markers and block scalars (| >) are skipped.
# Not handled: anchors, multi-line flow collections, quoted keys containing ': '.
# Runs under busybox awk (the guest) and mawk/gawk (host-side tests).

function trim(s) {
  sub(/^[ \t]+/, "", s)
  sub(/[ \t\r]+$/, "", s)
  return s
}

function unquote(s) {
  s = trim(s)
  if (s ~ /^".*"$/ || s ~ /^'.*'$/) return substr(s, 2, length(s) - 2)
  return s
}

function strip_comment(s) {
  if (s ~ /^["']/) return s
  sub(/[ \t]+#.*$/, "", s)
  return s
}

function emit(path, value) {
  print path "=" value
}

function join(prefix, key) {
  return prefix == "" ? key : prefix "." key
}

# Splits the inside of a flow collection on commas outside quotes.
function split_flow(s, parts,    n, i, c, q, cur) {
  n = 0
  cur = ""
  q = ""
  for (i = 1; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (q != "") {
      if (c == q) q = ""
      cur = cur c
    } else if (c == "\"" || c == "'") {
      q = c
      cur = cur c
    } else if (c == ",") {
      parts[n++] = cur
      cur = ""
    } else {
      cur = cur c
    }
  }
  if (trim(cur) != "") parts[n++] = cur
  return n
}

# Emits a value: a flow sequence, a flow mapping, or a scalar.
function value(path, v,    parts, n, i, kv, k) {
  v = trim(v)
  if (v ~ /^\[.*\]$/) {
    n = split_flow(substr(v, 2, length(v) - 2), parts)
    for (i = 0; i < n; i++) value(path "." i, parts[i])
  } else if (v ~ /^\{.*\}$/) {
    n = split_flow(substr(v, 2, length(v) - 2), parts)
    for (i = 0; i < n; i++) {
      kv = trim(parts[i])
      k = kv
      sub(/:.*$/, "", k)
      sub(/^[^:]*:/, "", kv)
      value(join(path, unquote(k)), kv)
    }
  } else {
    emit(path, unquote(v))
  }
}

function is_key_line(c) {
  return c !~ /^["'[{]/ && c ~ /^[^ \t]+:([ \t]|$)/
}

# A `key: value` line whose key starts at column n.
function key_line(n, c,    k, v, parent) {
  while (depth > 0 && ind[depth] >= n) depth--
  parent = path[depth]
  # the key is everything before the first ': ' (or a trailing ':')
  match(c, /^[^ \t]+:([ \t]|$)/)
  k = substr(c, 1, RLENGTH)
  sub(/:[ \t]*$/, "", k)
  v = trim(substr(c, RLENGTH + 1))
  k = unquote(k)
  if (v == "") {
    depth++
    ind[depth] = n
    path[depth] = join(parent, k)
    item[depth] = 0
  } else if (v ~ /^[|>]/) {
    block = n
  } else {
    value(join(parent, k), v)
  }
}

# A `- ...` line whose dash is at column n.
function item_line(n, c,    parent, p, rest) {
  while (depth > 0 && (ind[depth] > n || (ind[depth] == n && item[depth]))) depth--
  parent = path[depth]
  p = join(parent, count[parent] + 0)
  count[parent]++
  depth++
  ind[depth] = n
  path[depth] = p
  item[depth] = 1
  rest = c
  sub(/^-[ \t]*/, "", rest)
  if (rest == "") return
  if (rest ~ /^-([ \t]|$)/) item_line(n + 2, rest)
  else if (is_key_line(rest)) key_line(n + 2, rest)
  else value(p, rest)
}

BEGIN {
  depth = 0
  path[0] = ""
  ind[0] = -1
  item[0] = 0
  block = -1
}

{
  line = $0
  sub(/\r$/, "", line)
  c = line
  sub(/^[ \t]+/, "", c)
  n = length(line) - length(c)
  if (block >= 0) {
    if (c == "" || n > block) next
    block = -1
  }
  if (c == "" || c ~ /^#/ || c ~ /^---/ || c ~ /^\.\.\./) next
  c = trim(strip_comment(c))
  if (c ~ /^-([ \t]|$)/) item_line(n, c)
  else if (is_key_line(c)) key_line(n, c)
}
