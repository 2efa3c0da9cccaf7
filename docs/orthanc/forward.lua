-- Orthanc -> medsr serve: every series that becomes stable is sent to medsr, except the
-- enhanced series medsr sends back (their instances arrived from the AE title MEDSR).
function OnStableSeries(seriesId, tags, metadata)
   local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
   local origin = ParseJson(RestApiGet('/instances/' .. instances[1]['ID'] .. '/metadata?expand'))
   if origin['RemoteAET'] ~= 'MEDSR' then
      RestApiPost('/modalities/medsr/store', seriesId)
   end
end
