-- wrk script: POST /v1/verify with a new made-up key of the username in $WRK_FLOOD_USER on
-- every request — keys shaped like that username's migrated legacy key, none of them real.
-- The attack the legacy gate exists for (every one would be a bcrypt without it). Used by
-- `keyledger-tools bench http --legacy-flood`.
local user = os.getenv("WRK_FLOOD_USER") or "nobody"
local token = os.getenv("WRK_TOKEN") or ""
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local secret = {}

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

function request()
  for j = 1, 44 do
    local n = math.random(64)
    secret[j] = alphabet:sub(n, n)
  end
  local body = '{"api_key":"' .. user .. '_v1_' .. table.concat(secret) .. '"}'
  return wrk.format("POST", "/v1/verify", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
  }, body)
end
