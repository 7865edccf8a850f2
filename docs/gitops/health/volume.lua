-- Argo CD health of storage.stratus.io/Volume (resource.customizations.health.storage.stratus.io_Volume).
-- status.status is Cinder's volume status. Nothing acts on Volumes yet (they are validated and stored): a Volume
-- without status is Healthy, as the API server stored it.
hs = {}
local st = obj.status
if st == nil or st.status == nil then
  hs.status = "Healthy"
  hs.message = "No status reported (volumes are not provisioned yet)"
  return hs
end
local gen = obj.metadata and obj.metadata.generation
if gen ~= nil and st.observedGeneration ~= nil and st.observedGeneration < gen then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. tostring(gen) .. " to be observed"
  return hs
end
local s = st.status
if s == "available" or s == "in-use" then
  hs.status = "Healthy"
  hs.message = s
  return hs
end
if s == "error" or string.sub(s, 1, 6) == "error_" then
  hs.status = "Degraded"
  hs.message = s
  if st.conditions ~= nil then
    for _, c in ipairs(st.conditions) do
      if c.status == "False" and c.message ~= nil then
        hs.message = s .. ": " .. c.message
      end
    end
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
