-- Argo CD health of storage.stratus.io/Volume (resource.customizations.health.storage.stratus.io_Volume).
-- status.status is Cinder's volume status, written by the operator from the volume host's report and the
-- attachments. The message of an error is the Ready condition's (the host's fault, NoValidHost, VolumeTypeNotFound);
-- a local volume attached over NBD from another node stays Healthy and says so (condition Degraded, reason
-- RemoteAttachment: a documented degraded mode, not a failure).
hs = {}
local st = obj.status
if st == nil or st.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to place the volume"
  return hs
end
local gen = obj.metadata and obj.metadata.generation
if gen ~= nil and st.observedGeneration ~= nil and st.observedGeneration < gen then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. tostring(gen) .. " to be observed"
  return hs
end
local function cond(t)
  if st.conditions == nil then
    return nil
  end
  for _, c in ipairs(st.conditions) do
    if c.type == t then
      return c
    end
  end
  return nil
end
local s = st.status
if s == "available" or s == "in-use" then
  hs.status = "Healthy"
  hs.message = s
  local d = cond("Degraded")
  if d ~= nil and d.status == "True" and d.message ~= nil then
    hs.message = s .. " (" .. d.message .. ")"
  end
  return hs
end
if s == "error" or string.sub(s, 1, 6) == "error_" then
  hs.status = "Degraded"
  hs.message = s
  local r = cond("Ready")
  if r ~= nil and r.status == "False" and r.message ~= nil then
    hs.message = s .. ": " .. r.message
  end
  return hs
end
if s == "maintenance" or s == "awaiting-transfer" then
  hs.status = "Suspended"
  hs.message = s
  return hs
end
-- creating, reserved, attaching, detaching, deleting, downloading, uploading, extending, retyping, backing-up, ...
hs.status = "Progressing"
hs.message = s
return hs
