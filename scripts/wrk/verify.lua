-- wrk script: POST /v1/verify cycling through the keys in $WRK_KEYS (one per line), with
-- the bearer token in $WRK_TOKEN and, when $WRK_FROM is set, that from address.
local keys = {}
local token = os.getenv("WRK_TOKEN") or ""
local from = os.getenv("WRK_FROM")
local i = 0

function init(args)
  local f = assert(io.open(os.getenv("WRK_KEYS"), "r"))
  for line in f:lines() do
    if #line > 0 then keys[#keys + 1] = line end
  end
  f:close()
  i = math.random(#keys)
end

function request()
  i = i % #keys + 1
  local body
  if from then
    body = '{"api_key":"' .. keys[i] .. '","from":"' .. from .. '"}'
  else
    body = '{"api_key":"' .. keys[i] .. '"}'
  end
  return wrk.format("POST", "/v1/verify", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
  }, body)
end
