-- wrk script: POST /v1/verify cycling through the keys in $WRK_KEYS (newline-separated,
-- handed over in the environment so they never touch a disk), with the bearer token in
-- $WRK_TOKEN and, when $WRK_FROM is set, that from address. Used by
-- `keyledger-tools bench http --generator wrk`.
local keys = {}
local token = os.getenv("WRK_TOKEN") or ""
local from = os.getenv("WRK_FROM")
local i = 0

function init(args)
  for line in string.gmatch(os.getenv("WRK_KEYS") or "", "[^\n]+") do
    keys[#keys + 1] = line
  end
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
