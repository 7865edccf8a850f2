-- Argo CD health of compute.stratus.io/Server (resource.customizations.health.compute.stratus.io_Server).
-- status.status is Nova's server status, derived from vmState and taskState by the controllers.
hs = {}
local st = obj.status
if st == nil or st.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to schedule the server"
  return hs
end
local spec = obj.spec or {}
local function faultMessage()
  if st.fault ~= nil and st.fault.message ~= nil then
    return st.fault.message
  end
  if st.conditions ~= nil then
    for _, c in ipairs(st.conditions) do
      if c.status == "False" and c.message ~= nil then
        return c.message
      end
    end
  end
  return "the server is in ERROR"
end
if st.status == "ERROR" then
  hs.status = "Degraded"
  hs.message = faultMessage()
  return hs
end
if st.taskState ~= nil then
  hs.status = "Progressing"
  hs.message = st.status .. " (" .. st.taskState .. ")"
  return hs
end
if st.status == "VERIFY_RESIZE" then
  hs.status = "Suspended"
  hs.message = "Resized or migrated: waiting for spec.triggers.confirmResize or revertResize"
  return hs
end
-- A trigger set in spec that the controllers have not acted on yet.
if spec.triggers ~= nil then
  local done = st.triggers or {}
  for name, value in pairs(spec.triggers) do
    if done[name] ~= value then
      hs.status = "Progressing"
      hs.message = "Waiting for trigger " .. name .. "=" .. tostring(value)
      return hs
    end
  end
end
local gen = obj.metadata and obj.metadata.generation
-- The condition of a type, when it is about the current generation.
local function current(type)
  if st.conditions ~= nil then
    for _, c in ipairs(st.conditions) do
      if c.type == type and c.observedGeneration == gen then
        return c
      end
    end
  end
  return nil
end
-- A flavor change (resize): not placed yet, or refused or reverted for this generation (the operator does not
-- retry it until spec changes again).
if spec.flavor ~= nil and st.flavor ~= nil and st.flavor.name ~= nil and st.flavor.name ~= spec.flavor then
  local resized = current("Resized")
  if resized ~= nil and resized.status == "False" then
    hs.status = "Degraded"
    hs.message = "Flavor " .. spec.flavor .. " not applied: " .. tostring(resized.message or resized.reason)
    return hs
  end
  hs.status = "Progressing"
  hs.message = "Waiting for the resize to flavor " .. spec.flavor
  return hs
end
local want = spec.powerState or "Running"
local expected = { Running = "ACTIVE", Stopped = "SHUTOFF", Paused = "PAUSED", Suspended = "SUSPENDED" }
if st.status == expected[want] then
  hs.status = "Healthy"
  hs.message = st.status
  return hs
end
local progressing = {
  BUILD = true, REBUILD = true, RESIZE = true, REVERT_RESIZE = true, MIGRATING = true,
  REBOOT = true, HARD_REBOOT = true, PASSWORD = true, DELETED = true, SOFT_DELETED = true,
}
if progressing[st.status] then
  hs.status = "Progressing"
  hs.message = st.status
  return hs
end
if st.status == "SHELVED" or st.status == "SHELVED_OFFLOADED" or st.status == "RESCUE" then
  hs.status = "Suspended"
  hs.message = st.status
  return hs
end
if st.status == "UNKNOWN" then
  hs.status = "Unknown"
  hs.message = "The server's hypervisor does not report (UNKNOWN)"
  return hs
end
-- ACTIVE, SHUTOFF, PAUSED or SUSPENDED, but not what spec.powerState asks, with no task under way.
hs.status = "Degraded"
hs.message = st.status .. " but spec.powerState is " .. want
for _, c in ipairs(st.conditions or {}) do
  if c.type == "ActionRefused" and c.status == "True" and c.message ~= nil then
    hs.message = hs.message .. ": " .. c.message
  end
end
return hs
