local header = "x-client-name"
local function is_trusted(name)
  for _, p in ipairs(trusted) do
    if string.find(name, p) ~= nil then return true end
  end
  return false
end
function envoy_on_request(handle)
  local headers = handle:headers()
  local asserted = headers:get(header)
  -- Remove every spelling an application could read as this header (x_client_name
  -- becomes HTTP_X_CLIENT_NAME in CGI-style servers).
  local spellings = {}
  for name, _ in pairs(headers) do
    if string.gsub(string.lower(name), "_", "-") == header then
      spellings[#spellings + 1] = name
    end
  end
  for _, name in ipairs(spellings) do
    headers:remove(name)
  end
  local caller, how = nil, "none"
  local ssl = handle:streamInfo():downstreamSslConnection()
  if ssl ~= nil then
    for _, uri in ipairs(ssl:uriSanPeerCertificate()) do
      if string.sub(uri, 1, #prefix) == prefix then
        caller, how = string.sub(uri, #prefix + 1), "mtls"
        break
      end
    end
  end
  if caller == nil then
    local address = handle:streamInfo():downstreamDirectRemoteAddress()
    local ip = string.match(address, "^%[?(.-)%]?:%d+$")
    if ip ~= nil and by_ip[ip] ~= nil then
      caller, how = by_ip[ip], "source-ip"
    end
  end
  if how == "mtls" and asserted ~= nil and asserted ~= "" and is_trusted(caller) then
    caller, how = asserted, "header"
  end
  if caller ~= nil then
    headers:add(header, caller)
  end
  local meta = handle:streamInfo():dynamicMetadata()
  meta:set("meshbridge", "caller", caller or "-")
  meta:set("meshbridge", "identity", how)
end
