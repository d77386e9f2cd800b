-- Argo CD health check for mailroom.dev/IncomingMailProvider (docs/gitops.md).
-- Ready True -> Healthy; Ready False -> Degraded, at once for what needs a person (a
-- wrong password, an untrusted certificate), and for what may pass by itself (a server
-- restarting, a Secret not created yet) only after three tests in a row failed, until
-- then Progressing; Ready Unknown, no status yet, or a status older than the spec
-- (observedGeneration behind metadata.generation) -> Progressing; suspended
-- (spec.suspend) -> Healthy, with "Suspended: ..." as the message: a provider paused on
-- purpose is in its desired state (as Flux counts it), and Argo CD's Suspended would
-- hold a sync wave after it for ever. The message is the Ready reason and message, as
-- `kubectl describe imp` shows them.
local passing = {
  SecretNotFound = true, TokenRefreshFailed = true, DNSResolutionFailed = true,
  ConnectionRefused = true, ConnectionTimedOut = true, NetworkUnreachable = true,
  ServerUnavailable = true, Timeout = true,
}
local hs = {status = "Progressing", message = "Waiting for the first test"}
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for a test of generation " .. tostring(generation)
  return hs
end
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      if condition.status == "True" or condition.reason == "Suspended" then
        hs.status = "Healthy"
      elseif condition.status == "False" then
        if not passing[condition.reason] or (obj.status.consecutiveFailures or 0) >= 3 then
          hs.status = "Degraded"
        end
      end
      hs.message = (condition.reason or "") .. ": " .. (condition.message or "")
      return hs
    end
  end
end
return hs
