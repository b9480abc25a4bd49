"""Runs the ingress identity filter's Lua program against requests, outside Envoy.

Usage: lua_identity.py SCRIPT.lua CASES.json  (prints the results as JSON on stdout)

Each case is {"headers": [[name, value], ...], "uri_sans": [...] or null (no TLS),
"remote": "IP:PORT"}; each result is {"headers": [[name, value], ...], "meta": {key: value}}:
the request headers after `envoy_on_request`, and the dynamic metadata it set.

The `handle` object follows Envoy's Lua filter API as the program uses it
(https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/lua_filter):
`handle:headers()` with `get` (first value), `remove` (every value), `add` (appended) and
iteration with `pairs`; `handle:streamInfo()` with `downstreamSslConnection()` (nil without
TLS; `uriSanPeerCertificate()` lists the peer certificate's URI SANs),
`downstreamDirectRemoteAddress()` ("IP:PORT", IPv6 in brackets) and
`dynamicMetadata():set(namespace, key, value)`. Header names are kept as given (Envoy
lower-cases HTTP/1 names before filters see them; the cases pass them lower-cased).

Lua 5.4 (lupa) stands in for Envoy's LuaJIT: the program uses only the string library and
tables, whose behaviour is the same in both, and `pairs` over the header map, which Envoy
provides through `__pairs` as Lua 5.4 does.
"""

import json
import sys

import lupa.lua54 as lupa

HARNESS = r"""
return function(case, meta_out)
  local list = {}
  for i, kv in ipairs(case.headers) do list[i] = {kv[1], kv[2]} end
  local headers = setmetatable({}, {
    __index = {
      get = function(_, name)
        for _, kv in ipairs(list) do if kv[1] == name then return kv[2] end end
        return nil
      end,
      remove = function(_, name)
        local kept = {}
        for _, kv in ipairs(list) do if kv[1] ~= name then kept[#kept + 1] = kv end end
        list = kept
      end,
      add = function(_, name, value) list[#list + 1] = {name, value} end,
    },
    __pairs = function(_)
      local i = 0
      return function()
        i = i + 1
        if list[i] ~= nil then return list[i][1], list[i][2] end
      end
    end,
  })
  local ssl = nil
  if case.uri_sans ~= nil then
    ssl = {uriSanPeerCertificate = function(_) return case.uri_sans end}
  end
  local info = {
    downstreamSslConnection = function(_) return ssl end,
    downstreamDirectRemoteAddress = function(_) return case.remote end,
    dynamicMetadata = function(_)
      return {set = function(_, ns, key, value) meta_out[ns .. ":" .. key] = value end}
    end,
  }
  local handle = {
    headers = function(_) return headers end,
    streamInfo = function(_) return info end,
  }
  envoy_on_request(handle)
  return list
end
"""


def to_lua(runtime, value):
    """JSON values as Lua tables (lists 1-based), None as nil."""
    if isinstance(value, list):
        return runtime.table_from({i + 1: to_lua(runtime, v) for i, v in enumerate(value)})
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items() if v is not None})
    return value


def main():
    script = open(sys.argv[1], encoding="utf-8").read()
    cases = json.load(open(sys.argv[2], encoding="utf-8"))
    results = []
    for case in cases:
        runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
        runtime.execute(script)
        run = runtime.execute(HARNESS)
        meta = runtime.table()
        headers = run(to_lua(runtime, case), meta)
        results.append(
            {
                "headers": [[kv[1], kv[2]] for kv in headers.values()],
                "meta": dict(meta.items()),
            }
        )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
